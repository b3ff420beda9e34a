"""The training template for runtimes: a Jinja chat template (GGUF metadata) and an Ollama ``Modelfile``.

A runtime must render a prompt exactly as training did (rule 6), or the fine-tune is wasted. Two cases:

- a format template (``qa``, custom strings): :func:`format_chat_template` writes a Jinja template that renders
  a conversation the way :meth:`Template.render_text` does -- a system message as ``"{content}\\n"``, earlier
  turns as ``"{role}: {content}\\n"``, the last user turn through the format string (``"Q: {prompt} A: "``);
- ``chat``: the tokenizer's own Jinja template goes into the GGUF unchanged.

Ollama speaks Go templates, not Jinja. :func:`role_wrappers` renders the Jinja template on a few probe
conversations and reads off what each role's content is wrapped in; the wrappers are checked by re-rendering
the probes, and only a template they reproduce exactly becomes a ``TEMPLATE``. Otherwise the Modelfile says so and
Ollama falls back to the chat template inside the GGUF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from easysft.data.templates import Template

_SLOT = "\x00EASYSFT{}\x00"


def _jinja_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def format_chat_template(template: Template) -> str:
    """A Jinja chat template equivalent to ``template.render_text`` (a format template) for chat requests."""
    pieces = template.format.format(prompt=_SLOT.format(0)).split(_SLOT.format(0))
    last_turn = " + message['content'] + ".join(_jinja_literal(piece) for piece in pieces)
    head = _jinja_literal(template.system + "\n") if template.system else None
    return (
        "{%- for message in messages -%}"
        + ("{%- if loop.first and message['role'] != 'system' -%}{{ " + head + " }}{%- endif -%}" if head else "")
        + "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
        "{%- elif loop.last and message['role'] == 'user' -%}{{ " + last_turn + " }}"
        "{%- else -%}{{ message['role'] + ': ' + message['content'] + '\\n' }}"
        "{%- endif -%}{%- endfor -%}"
    )


def gguf_chat_template(template: Template, tokenizer) -> str | None:
    """The chat template the GGUF carries: the training template's rendering, for any template kind."""
    if template.kind == "format":
        return format_chat_template(template)
    return getattr(tokenizer, "chat_template", None)


@dataclass(frozen=True)
class RoleWrappers:
    """What a chat template puts around each message: ``pre[role] + content + post[role]``.

    ``head`` opens a conversation that has no system message (a default system prompt); ``generation`` follows
    the last message when the model is to answer.
    """

    head: str
    pre: dict[str, str]
    post: dict[str, str]
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.head if not messages or messages[0]["role"] != "system" else ""
        for message in messages:
            role = message["role"]
            text += self.pre[role] + message["content"] + self.post[role]
        return text + (self.generation if add_generation_prompt else "")


def _probe(render, roles_contents: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    return render([{"role": role, "content": content} for role, content in roles_contents], add_generation_prompt)


def _common_suffix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[-1 - size] == b[-1 - size]:
        size += 1
    return a[len(a) - size:]


def role_wrappers(render) -> RoleWrappers | None:
    """Wrappers read off ``render(messages, add_generation_prompt) -> text``; None when they do not reproduce it."""
    s, u1, a1, u2 = (_SLOT.format(i) for i in range(4))
    try:
        user_only = _probe(render, [("user", u1)])
        with_answer = _probe(render, [("user", u1), ("assistant", a1)])
        second_turn = _probe(render, [("user", u1), ("assistant", a1), ("user", u2)])
        with_system = _probe(render, [("system", s), ("user", u1)])
        asking = _probe(render, [("user", u1)], add_generation_prompt=True)
        if not (with_answer.startswith(user_only) and second_turn.startswith(with_answer)
                and asking.startswith(user_only)):
            return None
        before_u1, after_u1 = user_only.split(u1)
        user_pre, user_post = second_turn[len(with_answer):].split(u2)
        assistant_pre, assistant_post = with_answer[len(user_only):].split(a1)
        system_pre, system_rest = with_system.split(s)
        if (after_u1 != user_post or not before_u1.endswith(user_pre)
                or not system_rest.endswith(user_pre + u1 + user_post)):
            return None
        system_post = system_rest[: len(system_rest) - len(user_pre + u1 + user_post)]
        wrappers = RoleWrappers(
            head=before_u1[: len(before_u1) - len(user_pre)],
            pre={"system": system_pre, "user": user_pre, "assistant": assistant_pre},
            post={"system": system_post, "user": user_post, "assistant": assistant_post},
            generation=asking[len(user_only):],
        )
        probes = [([("user", u1)], False), ([("user", u1), ("assistant", a1), ("user", u2)], True),
                  ([("system", s), ("user", u1), ("assistant", a1)], False), ([("system", s), ("user", u1)], True)]
        for turns, gen in probes:
            messages = [{"role": role, "content": content} for role, content in turns]
            if wrappers.render(messages, gen) != render(messages, gen):
                return None
        return wrappers
    except Exception:  # a template that refuses a probe (e.g. demands alternation) is simply not translated
        return None


def _go(text: str) -> str:
    """A Go template action printing ``text`` literally (Go's string escapes are JSON's)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def ollama_template(wrappers: RoleWrappers) -> str:
    """A Go template (Ollama TEMPLATE) rendering ``.Messages`` as ``wrappers`` does."""
    lines = [
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + _go(wrappers.head) + "{{ end }}",
        "{{- range $i, $_ := .Messages }}",
        '{{- if eq .Role "system" }}' + _go(wrappers.pre["system"]) + "{{ .Content }}" + _go(wrappers.post["system"]),
        '{{- else if eq .Role "user" }}' + _go(wrappers.pre["user"]) + "{{ .Content }}" + _go(wrappers.post["user"]),
        "{{- else }}" + _go(wrappers.pre["assistant"]) + "{{ .Content }}" + _go(wrappers.post["assistant"]),
        "{{- end }}",
        '{{- if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}' + _go(wrappers.generation)
        + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


def format_ollama_template(template: Template) -> str:
    """A Go template for a format template (``Q: {prompt} A: ``), mirroring :func:`format_chat_template`."""
    pieces = template.format.format(prompt=_SLOT.format(0)).split(_SLOT.format(0))
    last_turn = "{{ .Content }}".join(_go(piece) for piece in pieces)
    head = _go(template.system + "\n") if template.system else ""
    return "\n".join([
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + head + "{{ end }}",
        "{{- range $i, $_ := .Messages }}",
        '{{- if eq .Role "system" }}{{ .Content }}' + _go("\n"),
        '{{- else if and (eq (len (slice $.Messages $i)) 1) (eq .Role "user") }}' + last_turn,
        "{{- else }}{{ .Role }}" + _go(": ") + "{{ .Content }}" + _go("\n"),
        "{{- end }}",
        "{{- end }}",
    ])


def modelfile_text(gguf_name: str, template: Template, tokenizer, generation, num_predict: int) -> str:
    """The Ollama Modelfile: FROM the GGUF, the training TEMPLATE, stop tokens and saved generation defaults."""
    lines = ["# Written by easysft export. Create the model with: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if template.kind == "format":
        go_template = format_ollama_template(template)
    else:
        def render(messages, add_generation_prompt):
            if template.system and (not messages or messages[0]["role"] != "system"):
                messages = [{"role": "system", "content": template.system}, *messages]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)

        wrappers = role_wrappers(render)
        go_template = ollama_template(wrappers) if wrappers else None
    if go_template is None:
        lines.append("# The chat template could not be translated to Go; Ollama uses the one inside the GGUF.")
    else:
        lines.append(f'TEMPLATE """{go_template}"""')
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token, ensure_ascii=False)}")
    if generation.do_sample:
        lines.append(f"PARAMETER temperature {generation.temperature}")
        lines.append(f"PARAMETER top_p {generation.top_p}")
        lines.append(f"PARAMETER top_k {generation.top_k}")
    else:
        lines.append("PARAMETER temperature 0")
    lines.append(f"PARAMETER repeat_penalty {generation.repetition_penalty}")
    lines.append(f"PARAMETER num_predict {num_predict}")
    return "\n".join(lines) + "\n"
