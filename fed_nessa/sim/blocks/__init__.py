"""The block engine: lazy devices in blocks (in-process or Ray actors), one partial sum per block per round."""
