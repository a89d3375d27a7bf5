"""fed_nessa.federated."""
