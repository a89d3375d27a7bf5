"""The privacy statement: what is guaranteed, to whom, under which assumptions.

One function builds the dict written into ``summary.json["privacy"]`` and into
the audit report, so the simulation, the server and the auditor say the same
thing in the same words. It states the unit and neighbouring relation (the
accountants here are for add/remove-one), the trust each noise placement needs,
and the two caveats auditors ask about first: no amplification is claimed from
the server's client sampling, and a speaker with k utterances is protected only
by group privacy.
"""

from __future__ import annotations

import math
from typing import Any

from fed_nessa.privacy.accounting import ACCOUNTANTS, EXAMPLE_PER_DEVICE_SENSITIVITY
from fed_nessa.privacy.events import DEVICE, DISTRIBUTED, EXAMPLE, LOCAL, MODES, UNITS

UNIT = "one utterance pair (x_i, y_i) on one device"
NEIGHBOURING = ("add/remove one utterance pair (x_i, y_i) on one device; every other pair, "
                "device and round unchanged")
DEVICE_UNIT = "everything one device holds: all its utterance pairs, in every round it joins"
DEVICE_NEIGHBOURING = ("add/remove one device together with all its pairs and all its contributions in every "
                       "round; every other device and round unchanged")
DEVICE_LEVEL = ("device-level: each device clips its whole round contribution (statistics weighted to at most "
                "device-stats-pairs pairs, the mean gradient over all its pairs clipped to device-clip-norm) and "
                "every participation is one full noisy sum with q = 1 (no sampling; the noise named by "
                "'mechanism'), composed over the rounds the "
                "device joined under its own participation limits (max-participations, min-separation). "
                "Example-level is implied: one changed pair moves a device's clipped contribution by at most "
                f"{EXAMPLE_PER_DEVICE_SENSITIVITY:g} x its clip, so epsilon_example is accounted at half the noise "
                "multiplier. Choose delta below 1 / number of devices")
DEVICE_GROUP = ("all of a speaker's utterances on one device are covered; a speaker present on k devices is "
                "protected by group privacy over those k devices")
NO_AMPLIFICATION = ("no privacy amplification is claimed from the server's choice of participants: "
                    "each device composes every local step of every round it joined")
SECAGG_HIDES = ("SecAgg+ hides each device's individual (masked, quantized) update from the server: "
                "the server reads only the sum over the devices whose shares arrived")
SECAGG_DOES_NOT_HIDE = ("SecAgg+ does not hide participation (which devices joined, declined, failed or "
                        "dropped out in each round), anything a device sends outside the masked vector "
                        "(declines, epsilon spent, reported metrics), message timing and sizes, or the "
                        "aggregate itself (which the DP noise protects)")


NOISE_SECURE = ("every Gaussian noise draw and every Poisson sample is drawn on the device from the OS CSPRNG "
                "(fresh bytes per draw, no seed); residual risk: floating-point Gaussian samplers can leak "
                "through low-order bits (Mironov, CCS 2012)")
#: What distributed mode with continuous Gaussian shares adds to NOISE_SECURE: the accounting's gap (issue 19).
NOISE_ROUNDED_GAUSSIAN = ("; then Flower's SecAgg+ quantizer rounds each device's noisy float vector "
                          "stochastically with numpy's global generator, and that rounding is NOT covered by "
                          "the accounting (each device's rounding depends on its own noisy value, so the "
                          "release is not a post-processing of the noisy sum): the stated epsilon is an "
                          "approximation; distributed-mechanism = skellam releases exactly what is accounted")
NOISE_SKELLAM = ("integer mechanism (distributed Skellam): each device scales its clipped contribution (device level: "
                 "its one clipped vector; example level: the sum of its clipped examples), rotates it (randomised "
                 "Hadamard, signs from the public round seed), rounds it to integers once (device level: re-drawn "
                 "until its L2 norm is within the accounted bound; example level: accounted with the coupled bound "
                 "clip + sqrt(dim) on how far two neighbouring inputs' roundings are apart), and adds integer Skellam "
                 "noise; "
                 "every rounding and noise draw comes from the OS CSPRNG on the device, SecAgg+ sums the integers "
                 "modulo 2^bits exactly (no Flower quantizer draw), and a sum that may have wrapped is refused. The "
                 "released integer sum is exactly what is accounted (RDP of the Skellam mechanism at the rounded "
                 "L2 and L1 bounds); no floating-point noise sample leaves a device")
#: The distributed mechanisms' names as outputs state them (config's DistributedMechanism values).
GAUSSIAN_NOISE = "gaussian"
SKELLAM_NOISE = "skellam"
NOISE_REPRODUCIBLE = ("REPRODUCIBLE NOISE (simulation key reproducible-noise = true): the noise is derived from a "
                      "public seed and can be recomputed and subtracted, so NO differential-privacy guarantee "
                      "holds for this run; the epsilons below are what the mechanisms would give with secret noise")
WHO_SETS_WHAT = ("each device's policy (epsilon budget, delta, smallest noise multipliers, g, payload bound, "
                 "participation limit) comes from the device's own node config and is fixed in its ledger "
                 "header at first open; the server's run-config only asks, and a request beyond a device's "
                 "policy is declined with the reason")
MALICIOUS_DEVICE = ("SecAgg+ here is semi-honest and validates no input: a malicious device can send any vector "
                    "inside the quantization range (bias or destroy the aggregate's utility, write any value "
                    "into the diagnostic saturation count) and can add no noise; in distributed mode each such "
                    "device among the g arrivals lowers the released noise std to sigma*sqrt((g-k)/g) for k of "
                    "them. It cannot read other devices' updates or change their ledgers")


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k*eps, k*e^((k-1)*eps)*delta): the standard group-privacy bound for k pairs."""
    if k < 1:
        raise ValueError(f"group size must be >= 1, got {k}")
    exponent = (k - 1) * epsilon
    factor = math.exp(exponent) if exponent < 700 else math.inf
    return k * epsilon, min(1.0, k * factor * delta)


def trust_statement(mode: str, min_arrivals: int | None = None,
                    reconstruction_threshold: int | None = None) -> str:
    """What the guarantee assumes in ``mode`` and what remains if that assumption fails."""
    if mode == LOCAL:
        return ("local: every device adds the full Gaussian noise to its own clipped update before it "
                "leaves the device, so the guarantee holds against the server, other devices and "
                "anyone who sees the update, with no trust in SecAgg+ or the server; SecAgg+ only "
                "adds confidentiality on top")
    if mode == DISTRIBUTED:
        arrivals = (f"max({min_arrivals}, ceil(min-arrival-fraction x cohort size))" if min_arrivals
                    else "the configured minimum number of")
        threshold = (f" (reconstruction threshold {reconstruction_threshold})"
                     if reconstruction_threshold else "")
        return ("distributed: each device adds only a share of the noise; the full noise exists only in "
                f"the secure sum. The guarantee against the server assumes SecAgg+ holds{threshold}: "
                "fewer colluding devices than the threshold with an honest-but-curious server that "
                f"follows the protocol and unmasks no aggregate of fewer than {arrivals} devices (checked "
                "before the unmasking shares are requested); "
                "noise is accounted only from the shares guaranteed to arrive. Against an observer of "
                "the released aggregate (other devices, the model's users) it needs only that the "
                "server follows the protocol. If SecAgg+ fails (the server sees an individual update, "
                "or colludes with threshold-many devices), that update carries only its own noise "
                "share: its protection is far weaker than the stated epsilon and must be treated as none")
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def rounded_gaussian(mode: str, mechanism: str) -> bool:
    """Distributed mode with continuous Gaussian shares: released after a rounding the accounting omits."""
    return mode == "distributed" and mechanism == GAUSSIAN_NOISE


def privacy_statement(mode: str, delta: float, epsilon_budget: float | None, accountant: str,
                      *, min_arrivals: int | None = None,
                      reconstruction_threshold: int | None = None,
                      reproducible_noise: bool = False, unit: str = EXAMPLE,
                      mechanism: str = GAUSSIAN_NOISE) -> dict[str, Any]:
    """The ``summary.json["privacy"]`` statement (callers add measured epsilons to it).

    ``mechanism`` names the noise (``gaussian``, or ``skellam``: the integer mechanism of
    ``dp-mode = distributed``); the statement's noise source says what it draws and from where.

    ``unit`` is the unit the budget and ``epsilon_*`` figures are stated in (``example`` or
    ``device``); ``privacy_unit`` names it in the output so the audit can check the claim.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if epsilon_budget is not None and not epsilon_budget > 0:
        raise ValueError(f"epsilon budget must be > 0, got {epsilon_budget!r}")
    device = unit == DEVICE
    return {
        "privacy_unit": unit,
        "unit": DEVICE_UNIT if device else UNIT,
        "neighbouring_relation": DEVICE_NEIGHBOURING if device else NEIGHBOURING,
        "level": DEVICE_LEVEL if device else ("example-level (per utterance pair); no device-level or speaker-level "
                                              "guarantee is claimed"),
        "mode": mode,
        "mechanism": mechanism,
        "trust": trust_statement(mode, min_arrivals, reconstruction_threshold),
        "delta": delta,
        "epsilon_budget": epsilon_budget,
        "accountant": accountant,
        "amplification": NO_AMPLIFICATION,
        "group_privacy": DEVICE_GROUP if device else (
            "a speaker with k utterance pairs on a device is protected only by group "
            "privacy: (k*epsilon, k*e^((k-1)*epsilon)*delta), i.e. roughly k times epsilon "
            "and much worse delta for large k"),
        "secure_aggregation_hides": SECAGG_HIDES,
        "secure_aggregation_does_not_hide": SECAGG_DOES_NOT_HIDE,
        "guarantee_holds": not reproducible_noise,
        "accounting_covers_release": not rounded_gaussian(mode, mechanism),
        "noise_source": NOISE_REPRODUCIBLE if reproducible_noise else (
            NOISE_SKELLAM if mechanism == SKELLAM_NOISE else
            NOISE_SECURE + (NOISE_ROUNDED_GAUSSIAN if rounded_gaussian(mode, mechanism) else "")),
        "who_sets_what": WHO_SETS_WHAT,
        "malicious_device": MALICIOUS_DEVICE,
    }
