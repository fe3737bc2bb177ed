"""Conversations as training rows: rendered with the tokenizer's chat template, the loss on assistant turns only.

A conversation (:mod:`adalora.run.chat_data`) becomes one row: the whole conversation as the chat template writes it
(``tokenizer.apply_chat_template``), tokenised once as transformers tokenises a rendered chat (no special tokens
added: the template writes them), truncated to ``--max-length`` at the end and left-padded like a prompt/completion
row (:mod:`adalora.run.lm_data`). Labels are the tokens of the trained assistant turns, each from the end of the
generation prompt through the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...: so the
model learns to stop), and -100 everywhere else: system and user turns, the template's headers and generation
prompts (``<|im_start|>assistant\\n``), the whitespace a template writes after a turn, and the padding. Which turns
are trained: every assistant turn, or only the last one of each conversation (``assistant_loss``); in TRL's
prompt/completion form only those of the completion.

Where the assistant turns are, in characters of the rendered text, comes from one of two sources:

- a template with ``{% generation %}`` blocks declares it: transformers' own assistant mask
  (``return_assistant_tokens_mask``) is used, one marked span per assistant message;
- any other template (most of them: SmolLM2's, Llama 3's and Qwen2.5's have no such blocks) is rendered on the
  conversation's beginnings: a turn starts where ``messages[:i]`` with the generation prompt ends (or, if the
  template writes no generation prompt, where the turn's content starts) and ends where ``messages[:i + 1]`` ends,
  trailing whitespace left out. That holds only if the template renders each beginning of a conversation as the
  beginning of the whole, which is checked for every turn: a template that rewrites earlier turns (Qwen3's drops
  their reasoning) is refused in one line rather than trained on wrong positions.

Token positions follow from the characters as transformers computes its assistant mask: a token carries the loss
if its character span (the fast tokenizer's offsets) overlaps a trained turn's. So both sources give the same
positions on a template that has generation blocks (tests/run/test_chat_template.py checks it).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .chat_data import ASSISTANT, AssistantLoss, Conversation, Conversations
from .lm_data import LMError, check_max_length, pad_id, padded_rows
from .lm_loss import IGNORE_INDEX

GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' marker of what the assistant writes
Turn = tuple[int, int]  # [start, end) token positions of one assistant turn


def chat_template(tokenizer: Any, conversations: Conversations) -> str:
    """The tokenizer's chat template (its default one, when it has several).

    Raises:
        LMError: if the tokenizer has none, or is not a fast tokenizer (turns are located by character offsets).
    """
    try:
        template = tokenizer.get_chat_template()
    except ValueError:
        template = None
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    if not template:
        raise LMError(
            f"{conversations.path} holds conversations ({conversations.kind}), but the tokenizer of {name} has no "
            "chat template to write them with; use a chat model, add a 'chat_template' to its tokenizer_config.json, "
            "or write the examples as prompt/completion text"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise LMError(
            f"conversations need a fast tokenizer (a tokenizer.json) to locate the assistant turns; {name} has a slow "
            "one"
        )
    return template


def encode_chat(
    tokenizer: Any, conversations: Conversations, max_length: int, assistant_loss: AssistantLoss = "all"
) -> dict[str, torch.Tensor]:
    """Tokenise ``conversations`` into fixed-length rows, the loss on their assistant turns (module docstring).

    Args:
        tokenizer: a fast tokenizer with a chat template.
        conversations: one split.
        max_length: tokens per row; a longer conversation is cut at the end.
        assistant_loss: ``all``: every assistant turn (of the completion, in the prompt/completion form) carries
            the loss; ``last``: only the last one of each conversation.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(len(conversations), max_length)``, left-padded;
        labels are the tokens of the trained turns and -100 elsewhere.

    Raises:
        LMError: in one line naming the file and the example, if the tokenizer has no chat template, the template
            refuses a conversation or cannot be located in, or ``max_length`` cuts a trained turn away entirely.
    """
    check_max_length(max_length)
    marked = GENERATION_BLOCK.search(chat_template(tokenizer, conversations)) is not None
    rows, cut = [], []  # cut: (where, message index, its turn, the conversation's tokens, the length keeping them)
    for conversation in conversations.items:
        where = conversations.where(conversation)
        chosen = conversation.trainable()
        chosen = chosen[-1:] if assistant_loss == "last" else chosen
        locate = marked_turns if marked else rendered_turns
        ids, turns = locate(tokenizer, conversation, chosen, where)
        lost = [(index, turn) for index, turn in zip(chosen, turns, strict=True) if turn[0] >= max_length]
        if lost:
            cut.append((where, *lost[0], len(ids), turns[-1][1]))
        rows.append(labelled(ids, turns, max_length))
    if cut:
        raise cut_away(cut, max_length)
    return padded_rows(rows, max_length, pad_id(tokenizer))


def labelled(ids: list[int], turns: list[Turn], max_length: int) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` cut to ``max_length`` tokens: labels are the ids inside the ``turns`` and -100 elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in turns:
        labels[start:end] = ids[start:end]
    return ids[:max_length], labels[:max_length]


def cut_away(cut: list[tuple[str, int, Turn, int, int]], max_length: int) -> LMError:
    """The one line for conversations whose trained turns ``max_length`` cuts away entirely (a turn that starts at
    or after it): the first of them, how many there are, and the length that keeps every trained turn of all."""
    where, index, (start, end), tokens, _ = cut[0]
    others = f", as it does a trained turn of {len(cut)} conversations in all" if len(cut) > 1 else ""
    return LMError(
        f"{where}: --max-length {max_length} cuts away its message {index + 1} (assistant) entirely (its tokens are "
        f"{start + 1}-{end} of {tokens}){others}; --max-length {max(c[-1] for c in cut)} keeps every trained turn, "
        "or shorten the conversations"
    )


def render(tokenizer: Any, conversation: Conversation, where: str, end: int | None = None, **options: Any) -> Any:
    """``apply_chat_template`` of the conversation's first ``end`` messages.

    Raises:
        LMError: if the template refuses them (a template is the model author's program: whatever it raises,
            ``raise_exception("roles must alternate")`` included, is reported as its refusal, in one line).
    """
    try:
        return tokenizer.apply_chat_template(conversation.as_dicts(end), **options)
    except Exception as error:  # whatever a template raises: see the docstring
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LMError(f"{where}: the chat template refuses the conversation: {first}") from None


def rendered_turns(
    tokenizer: Any, conversation: Conversation, chosen: list[int], where: str
) -> tuple[list[int], list[Turn]]:
    """The conversation's token ids, and the token span of each assistant message in ``chosen`` (by index), from
    renderings of its beginnings (module docstring).

    Raises:
        LMError: if the template refuses the conversation, or a rendering of a beginning is not the beginning of the
            whole rendering.
    """
    text = render(tokenizer, conversation, where, tokenize=False)
    spans = [character_span(tokenizer, conversation, index, text, where) for index in chosen]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return list(encoded["input_ids"]), [token_span(encoded["offset_mapping"], span) for span in spans]


def character_span(tokenizer: Any, conversation: Conversation, index: int, text: str, where: str) -> tuple[int, int]:
    """``[start, end)`` characters of message ``index`` (an assistant turn) in ``text``, the whole rendering: from
    the end of the generation prompt after the messages before it, to the end of its own rendering less trailing
    whitespace (the end-of-turn token is in, the newline a template writes after it is not). A template that writes
    no generation prompt gets the turn from its content, so that its header carries no loss.

    Raises:
        LMError: if the renderings of the beginnings are not beginnings of ``text``.
    """
    before = render(tokenizer, conversation, where, index, tokenize=False, add_generation_prompt=True)
    through = render(tokenizer, conversation, where, index + 1, tokenize=False)
    if not (through.startswith(before) and text.startswith(through)):
        raise LMError(
            f"{where}: the chat template does not write the conversation up to its message {index + 1} as the "
            "beginning of the whole conversation, so its assistant turns cannot be located; use a template that "
            "marks them with {% generation %} blocks"
        )
    start, end = len(before), len(through.rstrip())
    if before == render(tokenizer, conversation, where, index, tokenize=False):  # no generation prompt
        content = through.find(conversation.messages[index][1].strip(), start)
        start = start if content < 0 else content
    if end <= start:
        raise LMError(f"{where}: the chat template writes nothing for its message {index + 1} (assistant)")
    return start, end


def token_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> Turn:
    """``[first, last + 1)`` of the tokens whose characters (``offsets``, ``[start, end)`` per token) overlap
    ``span``: the rule of transformers' assistant mask, so a token that straddles a turn's edge carries the loss."""
    inside = [i for i, (start, end) in enumerate(offsets) if start < span[1] and end > span[0]]
    return (inside[0], inside[-1] + 1) if inside else (len(offsets), len(offsets))


def marked_turns(
    tokenizer: Any, conversation: Conversation, chosen: list[int], where: str
) -> tuple[list[int], list[Turn]]:
    """The conversation's token ids, and the token span of each assistant message in ``chosen`` (by index), from the
    template's ``{% generation %}`` blocks (transformers' assistant mask): one run of masked tokens per assistant
    message, in order.

    Raises:
        LMError: if the template refuses the conversation, or marks another number of spans than it has assistant
            messages.
    """
    options = {"return_dict": True, "return_assistant_tokens_mask": True, "tokenizer_kwargs": {"verbose": False}}
    out = render(tokenizer, conversation, where, **options)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    runs, start = [], None  # [start, end) of each run of 1s
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    assistants = [i for i, (role, _) in enumerate(conversation.messages) if role == ASSISTANT]
    if len(runs) != len(assistants):
        raise LMError(
            f"{where}: the chat template's {{% generation %}} blocks mark {len(runs)} spans in a conversation of "
            f"{len(assistants)} assistant messages; a template must mark each assistant message once"
        )
    return ids, [runs[assistants.index(index)] for index in chosen]
