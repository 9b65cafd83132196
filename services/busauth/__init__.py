"""The bus's identities: answers nats-server's auth callout, closes revoked connections."""
