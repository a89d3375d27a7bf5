"""The fed-nessa ServerApp: cohort planning, SecAgg+ rounds, evaluation, checkpoints, run folder."""
