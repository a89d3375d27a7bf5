"""Client mods.

Flower's ``secaggplus_mod`` assumes every TRAIN message is a SecAgg+ stage and
fails on anything else (it requires the ``secaggplus_configs`` record). The
mod here applies it only to messages that carry that record, so the same
ClientApp can also answer the light pre-round ``query`` (plan) message.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fed_nessa.config import from_run_config
from fed_nessa.federated.secagg_field import exact_secaggplus_mod


def is_secagg_message(msg: Message) -> bool:
    """True for the stages of a SecAgg+ round (setup, share keys, collect, unmask)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_only_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run ``secaggplus_mod`` on SecAgg+ messages only; pass every other message through.

    ``distributed-mechanism = skellam``: Flower's mod with the exact quantizer
    (:data:`~fed_nessa.federated.secagg_field.exact_secaggplus_mod`): the device's field elements
    pass unchanged and no draw is taken from numpy's global generator.
    """
    if is_secagg_message(msg):
        exact = from_run_config(dict(context.run_config)).integer_noise
        return (exact_secaggplus_mod if exact else secaggplus_mod)(msg, context, call_next)
    return call_next(msg, context)
