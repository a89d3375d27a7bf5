"""FederationConfig: every out-of-range or mistyped key is named, with its allowed range, before any round."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fed_nessa.config import ConfigError, FederationConfig, from_run_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = from_run_config({})
    assert cfg == FederationConfig()
    assert from_run_config(cfg.to_run_config()) == cfg


def test_pyproject_app_config_matches_the_defaults() -> None:
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederationConfig().to_run_config()
    assert set(table) == set(defaults)
    # The values too: `flwr run` uses this table, `fed-nessa simulate` the dataclass defaults.
    differ = {k: (table[k], defaults[k]) for k in defaults if table[k] != defaults[k]}
    assert differ == {}, f"pyproject.toml value vs FederationConfig default: {differ}"
    assert from_run_config(table) == FederationConfig()  # valid as shipped, and the same config


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("num-server-rounds", 0, "num-server-rounds = 0: allowed range [1, 100000]"),
    ("clip-norm", -1.0, "clip-norm = -1.0: allowed range (0, 1e+06]"),
    ("delta", 0.5, "delta = 0.5: allowed range (0, 0.1]"),
    ("dp-mode", "global", "dp-mode = 'global': allowed values local, distributed, none"),
    ("secagg-num-shares", 2, "secagg-num-shares = 2: allowed range [3, 10000]"),
    ("secagg-reconstruction-threshold", 11, "allowed range [2, secagg-num-shares - 1 = 10]"),
    ("min-arrivals", 1001, "min-arrivals = 1001: allowed range [2, devices per round = 1000]"),
    ("gate-confidence", 0.3, "gate-confidence = 0.3: allowed range [0.5, 1)"),
    ("gate-confidence", 1.0, "gate-confidence = 1.0: allowed range [0.5, 1)"),
    ("linear-start", "ridge", "allowed values suffstats, none"),
    ("lr", "fast", "lr = 'fast': expected a number"),
    ("resume", 1, "resume = 1: expected true or false"),
    ("batch-size", True, "expected a int, got a boolean"),
    ("depth", 0, "depth = 0: allowed range [1, 16]"),
])
def test_out_of_range_value_names_key_and_range(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_run_config({key: value})
    assert fragment in str(err.value)


def test_every_problem_is_reported_at_once_and_unknown_keys_are_rejected() -> None:
    with pytest.raises(ConfigError) as err:
        from_run_config({"lr": -1, "noise-multiplier": -2, "clip_norm_typo": 1})
    assert "clip_norm_typo: unknown key" in str(err.value)
    with pytest.raises(ConfigError) as err:
        from_run_config({"lr": -1, "noise-multiplier": -2})
    assert len(err.value.problems) >= 2


def test_secagg_sum_must_not_wrap_around() -> None:
    with pytest.raises(ConfigError, match=r"must be < 2\*\*32"):
        from_run_config({"clients-per-round": 2000, "num-devices": 5000, "secagg-quantization-range": 2**22})
    from_run_config({"clients-per-round": 1000, "num-devices": 1000})
    # The statistics round sums every device, not only a DP-SGD round's cohort.
    with pytest.raises(ConfigError, match=r"must be < 2\*\*32"):
        from_run_config({"clients-per-round": 1000, "num-devices": 5000})
    from_run_config({"clients-per-round": 1000, "num-devices": 5000, "linear-start": "none"})
    # Full participation (clients-per-round = 0, the default): every device in every round.
    with pytest.raises(ConfigError, match=r"must be < 2\*\*32"):
        from_run_config({"num-devices": 5000, "linear-start": "none"})


def test_min_arrivals_is_bounded_by_the_devices_per_round() -> None:
    with pytest.raises(ConfigError, match=r"min-arrivals = 101: allowed range \[2, devices per round = 100\]"):
        from_run_config({"clients-per-round": 100, "min-arrivals": 101})
    assert from_run_config({"min-arrivals": 101}).cohort_size(1000) == 1000  # 0: all 1000 devices


def test_dp_needs_noise_and_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be > 0 when dp-mode is 'local'"):
        from_run_config({"dp-mode": "local", "noise-multiplier": 0})
    assert from_run_config({"dp-mode": "none", "noise-multiplier": 0, "lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="not 'synthetic', 'real-dev', 'kokoro-voices' or an existing folder"):
        from_run_config({"data-source": "no/such/folder"}, base_dir=tmp_path)
    assert from_run_config({"data-source": "."}, base_dir=tmp_path).data_source == "."


@pytest.mark.parametrize("key", ["lr", "clip-norm", "noise-multiplier", "epsilon-budget"])
def test_nan_and_inf_are_rejected(key: str) -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"{key} = {bad!r}: must be a finite number"):
            from_run_config({key: bad})


def test_device_policy_from_a_node_config() -> None:
    from fed_nessa.config import POLICY_KEYS, DevicePolicy, policy_from_node_config

    assert policy_from_node_config({}) == DevicePolicy()
    assert POLICY_KEYS == set(DevicePolicy().to_node_config())
    policy = policy_from_node_config({"epsilon-budget": 4, "guaranteed-arrivals": 20, "allow-non-dp": "true",
                                      "shard-path": "/x", "partition-id": 3})
    assert policy == DevicePolicy(epsilon_budget=4.0, guaranteed_arrivals=20, allow_non_dp=True)
    assert policy_from_node_config(policy.to_node_config()) == policy == DevicePolicy.from_dict(policy.to_dict())
    with pytest.raises(ConfigError) as err:
        policy_from_node_config({"epsilon-budget": float("nan"), "guaranteed-arrivals": 0, "delta": "x"})
    assert "node config delta = 'x': expected a number" in str(err.value)
    with pytest.raises(ConfigError) as err:
        policy_from_node_config({"epsilon-budget": -1, "guaranteed-arrivals": 0})
    assert "device policy epsilon-budget = -1.0" in str(err.value) and "guaranteed-arrivals = 0" in str(err.value)


def test_allow_reproducible_noise_is_a_device_key_kept_in_the_ledger_header(tmp_path: Path) -> None:
    """Issue 17 item 1: one definition (DevicePolicy), off by default, carried by the node config and the
    ledger header; a later node config cannot switch it on for a ledger that started without it."""
    from fed_nessa.config import DevicePolicy, policy_from_node_config
    from fed_nessa.privacy.ledger import DeviceLedger

    assert DevicePolicy().allow_reproducible_noise is False
    allows = policy_from_node_config({"allow-reproducible-noise": "true"})
    assert allows.allow_reproducible_noise and allows.to_node_config()["allow-reproducible-noise"] is True
    DeviceLedger.open(tmp_path / "dev", "dev-1", policy=DevicePolicy())
    reopened = DeviceLedger.open(tmp_path / "dev", "dev-1", policy=allows)
    assert reopened.policy is not None and reopened.policy.allow_reproducible_noise is False
