"""LWM's chat form, the one template every chat example here is written in (text chats in
lwm_data.text.chat, vision conversations in lwm_data.vision.sequences):

    <s>You are a helpful assistant. USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...

Each piece is tokenized on its own, as LWM's processor tokenizes the fields of a spec; the defaults are
LWM's strings, and each can be changed for another model's template.
"""

from __future__ import annotations

from dataclasses import dataclass

from lwm_data.config import setting


@dataclass(frozen=True)
class ChatTemplate:
    system: str = setting("You are a helpful assistant. USER:", "Chat template: the system prompt, before the context.")
    first_question: str = setting("{question} ASSISTANT:", "Chat template: the first question, after the context.")
    next_question: str = setting("USER: {question} ASSISTANT:", "Chat template: every later question.")
