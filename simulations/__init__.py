"""Simulations: the in-process Grid and the runner behind ``fed-nessa simulate``."""
