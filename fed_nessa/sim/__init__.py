"""fed_nessa.sim."""
