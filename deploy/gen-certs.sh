#!/usr/bin/env bash
# Certificates for a fedspatial coordinating center (the Flower SuperLink).
#
#   deploy/gen-certs.sh [-o DIR] [-k CA_DIR] [--days N] [--ca-days N] [--renew] NAME_OR_IP [...]
#
# Writes to DIR (default: ./certs), the folder `fedspatial server --certs` reads:
#   ca.crt      CA certificate.    Give it to every hospital (`fedspatial client --ca-cert`)
#               and to everybody who submits runs (`root-certificates` in ~/.flwr/config.toml).
#   server.key  server private key (stays on the SuperLink host, mode 600).
#   server.crt  server certificate for the names/IPs given, signed by the CA.
# and to CA_DIR (default: DIR-ca-private, e.g. ./certs-ca-private; never inside DIR):
#   ca.key      CA private key (mode 600). It signs server certificates: keep it offline.
#               `fedspatial server` refuses to start while it is in DIR.
#
# Every NAME_OR_IP the hospitals use to reach the center must be listed (DNS name or IP
# address); localhost and 127.0.0.1 are always added because the SuperLink connects to
# itself over TLS to start the ServerApp.
#
# An existing CA is reused, so renewing the server certificate (--renew) needs nothing new
# at the hospitals. Without --renew an existing server certificate is never overwritten.
set -euo pipefail

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

out="certs"
ca_dir=""
days=365
ca_days=3650
renew=0
names=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -o|--out) out="$2"; shift 2 ;;
        -k|--ca-dir) ca_dir="$2"; shift 2 ;;
        --days) days="$2"; shift 2 ;;
        --ca-days) ca_days="$2"; shift 2 ;;
        --renew) renew=1; shift ;;
        -h|--help) usage 0 ;;
        -*) echo "gen-certs.sh: unknown option $1" >&2; usage 2 ;;
        *) names+=("$1"); shift ;;
    esac
done
if [[ ${#names[@]} -eq 0 ]]; then
    echo "gen-certs.sh: give the host name(s) or IP address(es) hospitals use to reach the center" >&2
    usage 2
fi
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

out="${out%/}"
ca_dir="${ca_dir:-$out-ca-private}"
mkdir -p "$out"
umask 077  # private keys (and the CA folder) readable by their owner only
mkdir -p "$ca_dir"
if [[ "$(cd "$ca_dir" && pwd -P)/" == "$(cd "$out" && pwd -P)/"* ]]; then
    rmdir "$ca_dir" 2>/dev/null || true
    echo "gen-certs.sh: the CA folder $ca_dir is inside $out, which the server reads; give another -k/--ca-dir" >&2
    exit 2
fi
if [[ -f "$out/ca.key" ]]; then
    echo "gen-certs.sh: $out/ca.key is where the server can read it; move it first: mv $out/ca.key $ca_dir/" >&2
    exit 1
fi

# subjectAltName: IPs as IP:, everything else as DNS:; loopback always included.
san="DNS:localhost,IP:127.0.0.1"
for n in "${names[@]}"; do
    if [[ "$n" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$n" == *:* ]]; then
        entry="IP:$n"
    else
        entry="DNS:$n"
    fi
    [[ ",$san," == *",$entry,"* ]] || san="$san,$entry"
done

if [[ -f "$out/server.crt" && $renew -eq 0 ]]; then
    echo "gen-certs.sh: $out/server.crt exists; pass --renew to replace it (rotation)" >&2
    exit 1
fi

if [[ -f "$out/ca.crt" && -f "$ca_dir/ca.key" ]]; then
    echo "reusing the CA in $out/ca.crt (key: $ca_dir/ca.key)"
elif [[ -f "$out/ca.crt" ]]; then
    echo "gen-certs.sh: $out/ca.crt exists but its key is not in $ca_dir/ca.key; give its folder with -k/--ca-dir" >&2
    exit 1
else
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
        -keyout "$ca_dir/ca.key" -out "$out/ca.crt" -days "$ca_days" \
        -subj "/O=fedspatial/CN=fedspatial federation CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    echo "new CA: $out/ca.crt (valid $ca_days days); its private key: $ca_dir/ca.key (keep it offline)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/ext.cnf" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
    -keyout "$tmp/server.key" -out "$tmp/server.csr" \
    -subj "/O=fedspatial/CN=${names[0]}" 2>/dev/null
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$ca_dir/ca.key" \
    -CAserial "$ca_dir/ca.srl" -CAcreateserial -days "$days" -sha384 -extfile "$tmp/ext.cnf" \
    -out "$tmp/server.crt" 2>/dev/null
# Replace both files only once the new pair is complete.
mv "$tmp/server.key" "$out/server.key"
mv "$tmp/server.crt" "$out/server.crt"
chmod 644 "$out/ca.crt" "$out/server.crt"

echo "server certificate: $out/server.crt (valid $days days) for $san"
openssl x509 -in "$out/server.crt" -noout -enddate
