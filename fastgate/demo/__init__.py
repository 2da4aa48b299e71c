"""`fastgate demo`: the gateway in front of a bundled mock AI upstream."""
