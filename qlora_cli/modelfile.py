"""The Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE (a Go template), SYSTEM and PARAMETER stop.

The TEMPLATE is derived, not hand-written per model family: the tokenizer's Jinja chat template is rendered with
marker messages, and the text around each marker becomes the prefix and suffix of that role. The result is one
line of Go template in the shape of Ollama's own templates (a range over .Messages, one branch per role, the
generation prompt after the last message). :func:`render` is a small renderer of exactly that subset, so the export
checks that the TEMPLATE renders a two-turn conversation as the chat template does, and the tests can too.

Recipes trained on prompt -> completion data (data.prompt_template, or the Alpaca layout) get that template around
``{{ .Prompt }}`` instead: the model answers prompts in the form it was trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
MARK = "\x02{role}{n}\x03"  # marker contents: control characters no template adds


@dataclass
class ChatTemplate:
    """Per-role text around a message's content, the generation prompt, and a default system prompt."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None = None
    start: str = ""  # text before the first message (e.g. the BOS token)


@dataclass
class Modelfile:
    template: str
    stops: list[str]
    system: str | None = None
    notes: list[str] = field(default_factory=list)

    def text(self, gguf_name: str) -> str:
        lines = [*(f"# {n}" for n in self.notes), f"FROM ./{gguf_name}", f'TEMPLATE """{self.template}"""']
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f'PARAMETER stop "{_quote(s)}"' for s in self.stops]
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_jinja(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def analyse_chat_template(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate | None:
    """The role prefixes/suffixes of the tokenizer's chat template, or None when it does not fit that shape."""
    mark = {r: MARK.format(role=r, n=1) for r in ROLES}
    user2 = MARK.format(role="user", n=2)
    convo = [{"role": "user", "content": mark["user"]}, {"role": "assistant", "content": mark["assistant"]},
             {"role": "user", "content": user2}]
    try:
        text = _render_jinja(tokenizer, convo, generation=True)
        bare = _render_jinja(tokenizer, convo, generation=False)
    except Exception:  # noqa: BLE001 - a template may refuse anything; then there is no chat TEMPLATE
        return None
    if not text.startswith(bare):
        return None
    generation = text[len(bare):]
    pieces = re.split("(\x02[a-z]+\\d\x03)", bare)  # text, marker, text, marker, ...
    try:
        ends_with_answer = re.split("(\x02[a-z]+\\d\x03)", _render_jinja(tokenizer, convo[:2], generation=False))
    except Exception:  # noqa: BLE001
        return None
    if len(pieces) != 7 or len(ends_with_answer) != 5:
        return None
    lead, between_ua, between_au, user_suffix = pieces[0], pieces[2], pieces[4], pieces[6]
    assistant_suffix = ends_with_answer[4]  # what closes an answer: the text after it when it ends the conversation
    if not (between_ua.startswith(user_suffix) and between_au.startswith(assistant_suffix)):
        return None
    assistant_prefix = between_ua[len(user_suffix):]
    user_prefix = between_au[len(assistant_suffix):]
    if not user_prefix or not lead.endswith(user_prefix):
        return None
    before_user = lead[: len(lead) - len(user_prefix)]
    prefix = {"user": user_prefix, "assistant": assistant_prefix}
    suffix = {"user": user_suffix, "assistant": assistant_suffix}
    try:
        with_system = _render_jinja(tokenizer, [{"role": "system", "content": mark["system"]}, convo[0]], False)
    except Exception:  # noqa: BLE001 - the template has no system turn
        with_system = ""
    head, _, rest = with_system.partition(mark["system"])
    turn = user_prefix + mark["user"] + user_suffix
    for start in dict.fromkeys(("", tokenizer.bos_token or "")):  # fixed text before the first turn: none, or BOS
        if not before_user.startswith(start):
            continue
        chat = ChatTemplate(dict(prefix), dict(suffix), generation, None, start)
        block = before_user[len(start):]
        if head.startswith(start) and rest.endswith(turn):  # a system turn of its own: prefix, content, suffix
            chat.prefix["system"], chat.suffix["system"] = head[len(start):], rest[: len(rest) - len(turn)]
            if block:  # the template writes a system turn of its own when none is given
                if not (block.startswith(chat.prefix["system"]) and block.endswith(chat.suffix["system"])):
                    continue
                chat.default_system = block[len(chat.prefix["system"]): len(block) - len(chat.suffix["system"])]
            return chat
        if not block:
            return chat
    return None


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:] if n else ""


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def go_chat_template(chat: ChatTemplate) -> str:
    """One line of Go template, in the shape of Ollama's own: no {{- trimming, so every character is literal."""
    branches = []
    for role in ROLES:
        if role not in chat.prefix:
            continue
        closing = f"{{{{ if not $last }}}}{chat.suffix[role]}{{{{ end }}}}" if role == "assistant" \
            else chat.suffix[role]
        branches.append(f'{{{{ {"if" if not branches else "else if"} eq .Role "{role}" }}}}'
                        f"{chat.prefix[role]}{{{{ .Content }}}}{closing}")
    generation = f'{{{{ if and $last (ne .Role "assistant") }}}}{chat.generation}{{{{ end }}}}'
    return (f"{chat.start}{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
            + "".join(branches) + "{{ end }}" + generation + "{{ end }}")


def prompt_template(template: str) -> str:
    """A training prompt template (`{prompt}` or Alpaca's `{instruction}`) around Ollama's {{ .Prompt }}."""
    return template.replace("{input}", "").replace("{prompt}", "{{ .Prompt }}") \
        .replace("{instruction}", "{{ .Prompt }}")


def special_texts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The special tokens that occur in `text`, in order of appearance."""
    found = [(text.find(t), t) for t in tokenizer.all_special_tokens + [
        a.content for a in tokenizer.added_tokens_decoder.values() if a.special] if t and t in text]
    return list(dict.fromkeys(t for _, t in sorted(found)))


def build(tokenizer: PreTrainedTokenizerBase, fmt: str | None, template: str | None, adds_bos: bool) -> Modelfile:
    """The Modelfile's parts for a model trained on `fmt` data (None: no recipe; the chat template if any)."""
    from .data import ALPACA_TEMPLATE_NO_INPUT

    eos = tokenizer.eos_token
    stops = [eos] if eos else []
    if fmt in ("prompt_completion", "alpaca"):
        text = template or (ALPACA_TEMPLATE_NO_INPUT if fmt == "alpaca" else "{prompt}")
        return Modelfile(prompt_template(text), stops,
                         notes=[f"Prompts are wrapped as in training ({fmt}); answers end at {eos!r}."])
    if fmt == "text":
        return Modelfile("{{ .Prompt }}", stops, notes=["Trained on plain text: prompts are passed as typed."])
    chat = analyse_chat_template(tokenizer) if tokenizer.chat_template else None
    if chat is None:
        note = "The tokenizer has no chat template in a form qlora can translate: prompts are passed as typed."
        return Modelfile("{{ .Prompt }}", stops, notes=[note])
    if adds_bos and tokenizer.bos_token and chat.start.startswith(tokenizer.bos_token):
        chat.start = chat.start[len(tokenizer.bos_token):]  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
    stops = list(dict.fromkeys(special_texts(tokenizer, chat.suffix["assistant"]) + stops))
    return Modelfile(go_chat_template(chat), stops, chat.default_system,
                     notes=["TEMPLATE derived from the tokenizer's chat template."])


# ----------------------------------------------------------------------------- the Go template subset, rendered

_ACTION = re.compile(r"{{(.*?)}}", re.S)


def render(template: str, messages: list[dict[str, str]], system: str | None = None, prompt: str = "") -> str:
    """Render the templates this module writes as Ollama would (Go text/template semantics for that subset).

    Supported: literal text, {{ .Prompt }}, {{ range $i, $_ := .Messages }}, {{ $last := eq (len (slice $.Messages
    $i)) 1 }}, {{ if|else if eq .Role "x" }}, {{ if not $last }}, {{ if and $last (ne .Role "assistant") }},
    {{ .Content }}, {{ else }}, {{ end }}. Like Ollama, a SYSTEM prompt is added as the first message when the
    conversation has none.
    """
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            tokens.append(("text", template[pos:m.start()]))
        tokens.append(("action", m.group(1).strip()))
        pos = m.end()
    if pos < len(template):
        tokens.append(("text", template[pos:]))
    tree, rest = _parse(tokens, 0)
    if rest != len(tokens):
        raise ValueError("unbalanced {{ end }} in template")
    out: list[str] = []
    _run(tree, {"messages": messages, "prompt": prompt, "vars": {}, "msg": None}, out)
    return "".join(out)


def _parse(tokens: list[tuple[str, str]], i: int) -> tuple[list[Any], int]:
    """Nodes up to an unmatched end/else: (text, s), (expr, a), (if, [(cond, body), ...]) or (range, body)."""
    nodes: list[Any] = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
        elif value == "end" or value.startswith("else"):
            return nodes, i
        elif value.startswith("range "):
            body, i = _parse(tokens, i + 1)
            nodes.append(("range", body))
            i += 1
        elif value.startswith("if "):
            branches, cond = [], value[3:]
            while True:
                body, i = _parse(tokens, i + 1)
                branches.append((cond, body))
                action = tokens[i][1]
                if action == "end":
                    break
                cond = action[8:] if action.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
        else:
            nodes.append(("expr", value))
            i += 1
    return nodes, i


def _run(nodes: list[Any], ctx: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "range":
            for i, m in enumerate(ctx["messages"]):
                _run(node[1], {**ctx, "msg": m, "vars": {"$i": i}}, out)
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(cond, ctx):
                    _run(body, ctx, out)
                    break
        else:
            out.append(_value(node[1], ctx))


def _value(expr: str, ctx: dict[str, Any]) -> str:
    if expr == ".Prompt":
        return ctx["prompt"]
    if expr == ".Content":
        return ctx["msg"]["content"]
    if expr.startswith("$last :="):
        ctx["vars"]["$last"] = ctx["vars"]["$i"] == len(ctx["messages"]) - 1
        return ""
    raise ValueError(f"unsupported template action {{{{ {expr} }}}}")


def _truth(cond: str, ctx: dict[str, Any]) -> bool:
    cond = cond.strip()
    if cond == "true":
        return True
    if cond == "$last":
        return ctx["vars"]["$last"]
    if m := re.fullmatch(r'eq \.Role "(\w+)"', cond):
        return ctx["msg"]["role"] == m.group(1)
    if m := re.fullmatch(r'\(?ne \.Role "(\w+)"\)?', cond):
        return ctx["msg"]["role"] != m.group(1)
    if m := re.fullmatch(r"not (.+)", cond):
        return not _truth(m.group(1), ctx)
    if m := re.fullmatch(r"and (\$last) (\(.+\))", cond):
        return _truth(m.group(1), ctx) and _truth(m.group(2), ctx)
    raise ValueError(f"unsupported template condition {cond!r}")
