"""msgspec structs for every payload that enters or leaves the service."""
