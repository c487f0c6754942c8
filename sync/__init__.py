"""The sync path: the Graph client, Graph records, the sync engine, its lease and the terminal command."""
