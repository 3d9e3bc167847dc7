"""The wire vocabulary shared by the server and the sites: message names, payloads, the result line."""
