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


def is_secagg_message(msg: Message) -> bool:
    """True for the stages of a SecAgg+ round (setup, share keys, collect, unmask)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_only_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run ``secaggplus_mod`` on SecAgg+ messages only; pass every other message through."""
    if is_secagg_message(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)
