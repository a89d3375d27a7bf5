"""The fed-nessa ClientApp: shard -> plan/train -> SecAgg+-masked update (see ``client.app``)."""
