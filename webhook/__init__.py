"""The webhook path: signature, parsing, the inbox intake, the applier and replay."""
