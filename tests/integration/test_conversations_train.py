"""Tool-calling conversations end to end on a tiny model: training with generation eval (tool-call scores per
turn, parsed calls in the predictions file) and `easysft infer` writing the next turn's parsed tool calls."""

from __future__ import annotations

import csv
import json

from easysft.cli import main


def test_training_evaluates_tool_call_turns_and_writes_parsed_calls(tiny_model_dir, tool_data_file, tmp_path):
    data, template = tool_data_file
    out = tmp_path / "run"
    assert main(["train", "--data_path", data, "--model_name_or_path", tiny_model_dir, "--template", "chat",
                 "--chat_template", template, "--max_steps", "1", "--eval_fraction", "0.25", "--eval_generate",
                 "4", "--eval_max_new_tokens", "3", "--output_dir", str(out), "--tensorboard", "false",
                 "--cache_dir", str(tmp_path / "c"), "--metric_for_best_model", "eval_tool_call_exact"]) == 0
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval_tool_call_exact"' in line]
    assert evals and all(0.0 <= e["eval_tool_call_name"] <= 1.0 for e in evals)
    rows = [json.loads(line) for line in open(out / "eval_predictions" / "step-0.jsonl")]
    calls = [r for r in rows if r["reference_tool_calls"]]
    assert calls and calls[0]["reference_tool_calls"][0]["name"] == "get_weather"
    assert all(isinstance(r["tool_calls"], list) for r in rows)
    # a random tiny model writes no valid call: the exact score is what the predictions file says it is
    exact = sum(r["tool_calls"] == r["reference_tool_calls"] for r in calls) / len(calls)
    assert evals[0]["eval_tool_call_exact"] == exact


def test_infer_on_conversations_generates_the_next_turn_with_parsed_calls(tiny_model_dir, tool_data_file,
                                                                         tmp_path):
    data, template = tool_data_file
    rows = [json.loads(line) for line in open(data)]
    rows[0]["messages"] = rows[0]["messages"][:1]  # ends with the user's question: generate the next turn
    path = tmp_path / "open.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    target = tmp_path / "pred.csv"
    assert main(["infer", "--model_name_or_path", tiny_model_dir, "--data_path", str(path), "--split", "train",
                 "--eval_fraction", "0", "--template", "chat", "--chat_template", template, "--max_new_tokens",
                 "3", "--do_sample", "false", "--inference_output_path", str(target)]) == 0
    written = list(csv.DictReader(open(target, newline="")))
    assert [r["prompt"] for r in written] == ["What is the weather in Paris?", "Thanks"]
    assert written[1]["answer"] == "Glad to help." and all(json.loads(r["tool_calls"]) == [] for r in written)


def test_chat_with_tools_renders_calls_and_results_through_the_template(tokenizer, tiny_model, tmp_path):
    from easysft.chat import ChatSession, read_tools
    from easysft.generate.prompts import conversation_renderer
    from easysft.models.load import load_tokenizer
    from easysft.models.meta import resolve_settings
    from tests.conftest import ASSETS, tool_conversation

    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(tool_conversation(0)["tools"]))
    tools = read_tools(str(tools_file))
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]  # bare schema wrapped
    tokenizer.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"), chat_template=str(ASSETS / "chatml_tools.jinja"))
    settings = resolve_settings({}, tok, {"template": "chat", "max_prompt_len": 1024})
    session = ChatSession(tiny_model, tok, settings, tools=tools)
    session.record("Weather in Oslo?", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                       '</tool_call>')
    assert session.last_calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    session.add_tool_result("3C")
    text = tok.decode(session.prompt_ids(None))
    assert text.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
                         '"Oslo"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n3C\n'
                         '</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert '"name": "get_time"' in text  # the tools block
    assert session.prompt_ids(None) == conversation_renderer(tok).prompt_ids(session.history, tools)
    answer = session.reply(None)  # the tiny model answers from the tool result (random text, no call)
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool", "assistant"]
    assert session.history[-1]["content"] == answer and session.last_calls == []
