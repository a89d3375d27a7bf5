"""SecAgg+ codec: scaling into range, decode, and a saturated vector refused on the device."""

from __future__ import annotations

import numpy as np
import pytest

from fed_nessa.federated.codec import SaturationError, SecAggCodec, make_codec, saturation_note


def quantize_sum(payloads: list[np.ndarray], codec: SecAggCodec, rng: np.random.Generator) -> np.ndarray:
    """What SecAgg+ reveals: the mean of stochastically quantized, clipped payloads."""
    c, q = codec.clipping_range, codec.quantization_range
    total = np.zeros_like(payloads[0])
    for p in payloads:
        pre = (np.clip(p, -c, c) + c) * q / (2 * c)
        lo = np.floor(pre)
        total += lo + (rng.random(pre.shape) < pre - lo)
    return (total * 2 * c / q - len(payloads) * c) / len(payloads)


def test_decode_recovers_the_sum_within_the_stated_error() -> None:
    rng = np.random.default_rng(0)
    codec = make_codec(payload_bound=3.0, clipping_range=8.0, quantization_range=2**22, cohort=50)
    vecs = [np.clip(rng.normal(size=200), -3, 3).astype(np.float32) for _ in range(50)]
    payloads = [codec.encode(v)[0] for v in vecs]
    total, saturated = codec.decode(quantize_sum(payloads, codec, rng), 50)
    assert saturated == 0
    assert np.abs(total - np.sum(vecs, axis=0)).max() <= codec.sum_error_bound(50)
    assert total.dtype == np.float32 and total.shape == (200,)


def test_a_vector_that_would_saturate_fails_on_the_device() -> None:
    """Defect 4: saturation is caught by the device before anything is masked or sent.

    c5b415a let a device encode a saturated vector (the coordinates clipped silently by
    SecAgg+), counted it in the extra coordinate and had the SERVER raise for the whole
    round, so one device could halt every round.
    """
    codec = make_codec(payload_bound=1.0, clipping_range=8.0, quantization_range=2**22, cohort=300)
    v = np.random.default_rng(1).uniform(-1, 1, 64)
    payload, count = codec.encode(v)
    assert count == 0 and payload[-1] == 0.0 and len(payload) == 65
    v[:5] = 100.0  # 5 coordinates beyond the range after scaling
    with pytest.raises(SaturationError, match="5 coordinate"):
        codec.encode(v)
    edge = np.full(3, 2.0)  # exactly the clipping range after scaling (scale = 0.5 * 8 / 1): still inside
    assert codec.encode(edge)[1] == 0


def test_the_count_coordinate_is_a_diagnostic_that_never_raises() -> None:
    """Defect 4: whatever a device writes into the count coordinate, decoding and the note never halt."""
    rng = np.random.default_rng(1)
    codec = make_codec(payload_bound=1.0, clipping_range=8.0, quantization_range=2**22, cohort=300)
    payloads = [codec.encode(rng.uniform(-1, 1, 64))[0] for _ in range(300)]
    payloads[3][-1] = 3 * codec.saturation_unit  # a non-protocol value from one device
    _, saturated = codec.decode(quantize_sum(payloads, codec, rng), 300)
    assert saturated == 3
    note = saturation_note(saturated, 4)
    assert note is not None and "round 4" in note and "Diagnostic only" in note
    assert saturation_note(0, 4) is None
    payloads[3][-1] = codec.clipping_range  # as large as the range allows
    _, huge = codec.decode(quantize_sum(payloads, codec, rng), 300)
    assert huge > 0 and saturation_note(huge, 5) is not None


def test_honest_vectors_use_half_the_range_and_config_round_trips() -> None:
    codec = make_codec(2.0, 8.0, 2**22, 10)
    payload, sat = codec.encode(np.array([2.0, -2.0, 0.0]))
    assert sat == 0 and np.allclose(payload[:3], [4.0, -4.0, 0.0])
    assert SecAggCodec.from_config(codec.to_config()) == codec
    with pytest.raises(ValueError, match="codec key"):
        SecAggCodec.from_config({})


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="payload bound"):
        make_codec(0.0, 8.0, 2**22, 10)
    with pytest.raises(ValueError, match="non-finite"):
        make_codec(1.0, 8.0, 2**22, 3).encode(np.array([np.nan]))


def test_at_fleet_scale_the_count_is_switched_off_not_the_round() -> None:
    """A grid too coarse to carry the diagnostic count exactly for the cohort switches the count
    off (cap 0, always decoded as 0); the round is neither refused nor halted by that coordinate."""
    rng = np.random.default_rng(2)
    codec = make_codec(1.0, 8.0, 2**8, 1000)
    assert codec.saturation_cap == 0 and SecAggCodec.from_config(codec.to_config()) == codec
    vecs = [rng.uniform(-1, 1, 16) for _ in range(1000)]
    payloads = [codec.encode(v)[0] for v in vecs]
    payloads[7][-1] = codec.clipping_range  # a device writing the largest value into the count
    total, saturated = codec.decode(quantize_sum(payloads, codec, rng), 1000)
    assert saturated == 0
    assert np.abs(total - np.sum(vecs, axis=0)).max() <= codec.sum_error_bound(1000)


def test_device_error_std_bounds_the_rounding_error() -> None:
    import numpy as np

    from fed_nessa.federated.codec import make_codec

    codec = make_codec(50.0, 8.0, 2**10, 4)  # a coarse grid makes the rounding visible
    rng = np.random.default_rng(0)
    v = rng.uniform(-50, 50, 20_000)
    step = 2 * 8.0 / 2**10 / codec.scale
    # stochastic rounding to the grid, as SecAgg+ does in the scaled units
    lo = np.floor(v / step) * step
    rounded = lo + step * (rng.random(v.size) < (v - lo) / step)
    assert np.std(rounded - v) <= codec.device_error_std() * 1.02
    assert codec.device_error_std() == 0.5 * step
