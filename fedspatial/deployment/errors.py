"""The deployment error type and what Flower's exit codes mean to a hospital or the center."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class DeployError(RuntimeError):
    """A deployment check failed; the message says what happened and what to do."""


# Flower exit codes (flwr.supercore.exit.ExitCode) -> what a hospital or the center can do.
# A code may be refined by a marker in Flower's log: 305 covers every failed first contact.
SUPERNODE_EXIT_HELP: dict[tuple[int, str], str] = {
    (302, ""): "the authentication key {auth_key} is not an EC private key in OpenSSH format: "
    "make a new pair with `fedspatial keygen` and have the center register the new .pub",
    (305, "[code: 2004]"): "the SuperLink refused this SuperNode. Either (a) this hospital's "
    "public key is not registered at the center: send {auth_pub} to the coordinating center, "
    "who registers it with `flwr supernode register {auth_pub_name} <connection>`; or (b) a "
    "SuperNode with the same key is still marked online there (another copy is running, or "
    "one stopped less than about a minute ago without signing off): stop the other copy or "
    "wait a minute, then start again",
    (305, "CERTIFICATE_VERIFY_FAILED"): "the SuperLink's certificate could not be verified with "
    "{ca_cert}: the CA file is wrong or the center's certificate changed; start again to get "
    "the pre-flight diagnosis",
    (305, ""): "the first contact with the SuperLink failed (see the log above): check the "
    "address, that the SuperLink runs, and that this machine may connect out to it",
    (606, ""): "this hospital's Flower version differs from the center's: install the same "
    "fedspatial release (same flwr version) as the coordinating center",
}
SUPERLINK_EXIT_HELP: dict[tuple[int, str], str] = {
    (104, ""): "flower-superlink rejected its arguments (see the log above)",
    (105, ""): "the database {database} was written by another Flower version: start with the "
    "version that wrote it, or move the file away to start with an empty state "
    "(hospitals must then be registered again)",
}


def explain_exit(help_table: Mapping[tuple[int, str], str], code: int, log_lines: Sequence[str]) -> str | None:
    """The most specific explanation of Flower exit ``code`` given its log."""
    text = "\n".join(log_lines)
    for (known, marker), hint in help_table.items():
        if known == code and marker and marker in text:
            return hint
    return help_table.get((code, ""))
