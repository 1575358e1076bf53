"""LWM's chat form, the one template every chat example here is written in (text chats in
lwm_data.text.chat, vision conversations in lwm_data.vision.sequences):

    <s>You are a helpful assistant. USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...

Each piece is tokenized on its own, as LWM's processor tokenizes the fields of a spec; the defaults are
LWM's strings, and each can be changed for another model's template. LWM's vision prompts: a question
about an image or video is `{question}\n` then the vision block (vision_chat.py), and generation asks
`Generate an image of {caption}` / `Generate a video of {caption}` (vision_generation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from lwm_data.config import setting


@dataclass(frozen=True)
class ChatTemplate:
    system: str = setting("You are a helpful assistant. USER:", "Chat template: the system prompt, before the context.")
    first_question: str = setting("{question} ASSISTANT:", "Chat template: the first question, after the context.")
    next_question: str = setting("USER: {question} ASSISTANT:", "Chat template: every later question.")


GENERATE_IMAGE = "Generate an image of {caption}"  # LWM's vision_generation.py
GENERATE_VIDEO = "Generate a video of {caption}"
