"""`easysft infer` and `easysft chat` end to end on a tiny saved model (and one slow test on the bundled one)."""

from __future__ import annotations

import csv
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from easysft.cli import main
from easysft.config import GenerateConfig
from tests.distributed.dist_launch import free_port

REPO = Path(__file__).resolve().parents[2]
GREEDY = ["--do_sample", "false", "--max_new_tokens", "4"]


def read_rows(path: str, output_format: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        if output_format == "csv":
            return list(csv.DictReader(handle))
        return [json.loads(line) for line in handle]


def test_infer_writes_csv_and_jsonl_in_input_order(tmp_path, tiny_model_dir, qa_data_dir):
    from conftest import QA_ROWS

    outputs = {}
    for fmt in ("csv", "jsonl"):
        path = str(tmp_path / f"preds.{fmt}")
        code = main(["infer", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                     "--inference_output_path", path, "--output_format", fmt, "--per_device_eval_batch_size", "3",
                     *GREEDY])
        assert code == 0
        rows = read_rows(path, fmt)
        assert list(rows[0]) == ["prompt", "answer", "prediction"]
        assert [(r["prompt"], r["answer"]) for r in rows] == [(r["prompt"], r["answer"]) for r in QA_ROWS[:4]]
        outputs[fmt] = [r["prediction"] for r in rows]
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # the temp file was renamed away
    assert outputs["csv"] == outputs["jsonl"]  # greedy: same predictions whatever the format


def test_infer_with_lora_adapter_folder(tmp_path, tiny_model_dir, qa_data_dir):
    """A LoRA adapter folder is a valid --model_name_or_path: its base is loaded and the adapter applied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_model_dir
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    path = str(tmp_path / "preds.csv")
    assert main(["infer", "--model_name_or_path", str(adapter_dir), "--data_path", qa_data_dir,
                 "--inference_output_path", path, "--template", "qa", *GREEDY]) == 0
    assert len(read_rows(path, "csv")) == 4


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["infer", "--inference_output_path", "x.csv"], 2, "--data_path is required"),
        (["infer", "--data_path", "d", "--backend", "vllm"], 2, "pip install vllm"),
        (["infer", "--data_path", "d", "--model_name_or_path", "/no/such/model"], 4, "no such folder"),
        (["infer", "--data_path", "d", "--output_format", "xml"], 2, "--output_format"),
    ],
)
def test_infer_user_errors_are_one_line(capsys, tmp_path, qa_data_dir, tiny_model_dir, argv, code, words):
    argv = [qa_data_dir if a == "d" else a for a in argv]
    if "--model_name_or_path" not in argv:
        argv += ["--model_name_or_path", tiny_model_dir]
    if "vllm" in argv:
        from easysft import generate as G

        if G.vllm_available():
            pytest.skip("vllm is installed here")
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("easysft: error:")


def test_chat_prompt_answers_once_on_stdout(capsys, tiny_model_dir):
    argv = ["chat", "--model_name_or_path", tiny_model_dir, "--prompt", "Hello there", *GREEDY]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # greedy: reproducible
    assert first.endswith("\n") and first.count("\n") >= 1


def test_repl_commands_and_quiet_exits(tiny_model_dir, tokenizer, tiny_model):
    """The REPL loop in-process: commands, an answer, and Ctrl-D / Ctrl-C at the prompt exit with 0."""
    import io

    from easysft.chat import ChatSession, repl
    from easysft.generate import resolve_settings

    settings = resolve_settings({}, tokenizer, {"do_sample": False, "max_new_tokens": 3, "template": "qa"})
    for ending in (EOFError, KeyboardInterrupt):
        session = ChatSession(tiny_model.eval(), tokenizer, settings)
        lines = iter(["hi", "/system Be brief.", "/bogus", "/reset"])

        def read(prompt, lines=lines, ending=ending):
            try:
                return next(lines)
            except StopIteration:
                raise ending from None

        out = io.StringIO()
        assert repl(session, read=read, out=out) == 0
        text = out.getvalue()
        assert "assistant> " in text and "(system prompt set)" in text and "unknown command /bogus" in text
        assert "(conversation cleared)" in text and session.history == [] and session.system == "Be brief."


def test_chat_trims_oldest_turns_to_fit(tokenizer, tiny_model):
    from easysft.chat import ChatSession
    from easysft.generate import resolve_settings

    settings = resolve_settings({}, tokenizer, {"template": "qa", "max_prompt_len": 40})
    session = ChatSession(tiny_model, tokenizer, settings)
    session.history = [{"role": r, "content": f"turn {i} " + "word " * 6}
                       for i in range(6) for r in ("user", "assistant")]
    ids = session.prompt_ids("last question")
    text = tokenizer.decode(ids)
    assert len(ids) <= 40 and text.endswith("Q: last question A: ")
    assert "turn 5" in text and "turn 0" not in text  # the newest turns survive, the oldest went first


# ----------------------------------------------------------------------------------------------------------
# The REPL under a real pseudo-terminal.


class Terminal:
    """A child process on a pty (its controlling terminal), read with a timeout."""

    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            os.chdir(REPO)
            os.execvpe(argv[0], argv, env)
        self.buffer = ""
        self.position = 0

    def expect(self, marker: str, timeout: float = 120.0) -> str:
        """Text from the last match up to and including the next ``marker``."""
        deadline = time.monotonic() + timeout
        while marker not in self.buffer[self.position:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {marker!r}; output so far:\n{self.buffer}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"child ended before {marker!r}; output:\n{self.buffer}")
                self.buffer += data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        end = self.buffer.index(marker, self.position) + len(marker)
        chunk, self.position = self.buffer[self.position:end], end
        return chunk

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def wait(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:  # keep draining so the child never blocks on a full terminal buffer
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buffer += os.read(self.fd, 4096).decode("utf-8", errors="replace")
            except OSError:
                pass
        os.kill(self.pid, 9)
        raise AssertionError(f"chat did not exit; output:\n{self.buffer}")


def answer_of(chunk: str) -> str:
    """The assistant text in a chunk that ends at the next 'you> ' prompt."""
    return chunk.split("assistant> ", 1)[1].rsplit("you> ", 1)[0].strip()


def test_chat_repl_under_a_pty(tiny_model_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    term = Terminal([sys.executable, "-m", "easysft", "chat", "--model_name_or_path", tiny_model_dir,
                     "--do_sample", "false", "--max_new_tokens", "5"], env)
    try:
        term.expect("you> ", timeout=180)
        term.send("Hello, who are you?")
        first = answer_of(term.expect("you> "))
        term.send("Tell me more.")
        second_chunk = term.expect("you> ")
        assert "assistant> " in second_chunk
        term.send("/reset")
        term.expect("(conversation cleared)")
        term.expect("you> ")
        term.send("Hello, who are you?")
        again = answer_of(term.expect("you> "))
        assert again == first  # after /reset the same first question gets the same greedy answer
        term.send("/exit")
        assert term.wait() == 0
    finally:
        try:
            os.kill(term.pid, 9)
        except ProcessLookupError:
            pass
        os.close(term.fd)
    assert "Traceback" not in term.buffer


# ----------------------------------------------------------------------------------------------------------
# Several processes and the real model.


@pytest.mark.distributed
def test_data_parallel_under_torchrun_matches_one_process(tmp_path, tiny_model_dir):
    from conftest import QA_ROWS, write_qa_folder

    data_dir = write_qa_folder(tmp_path / "data", eval_rows=QA_ROWS)
    common = ["--model_name_or_path", tiny_model_dir, "--data_path", data_dir, "--per_device_eval_batch_size", "2",
              *GREEDY, "--repetition_penalty", "1.0"]
    single = str(tmp_path / "single.csv")
    assert main(["infer", *common, "--inference_output_path", single]) == 0
    multi = str(tmp_path / "multi.csv")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "easysft", "infer", *common, "--inference_output_path", multi],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_rows(multi, "csv") == read_rows(single, "csv")


@pytest.mark.slow
def test_bundled_model_batched_greedy_equals_sequential():
    """The real SmolLM2: batch sizes 1, 3 and 8 give exactly the one-prompt-at-a-time greedy tokens."""
    from easysft.generate import build_prompt_ids, cut_at_stop, generate_ids, resolve_settings
    from easysft.models.load import load_model_and_tokenizer

    model, tokenizer, resolved = load_model_and_tokenizer("bundled")
    model.eval()
    settings = resolve_settings(resolved.meta, tokenizer, {"do_sample": False, "template": "qa"})
    texts = ["Hi", "Name a fruit.", "What is the capital of France?",
             "Write one sentence about the sea, the wind, the boats in the harbour and the gulls above them."]
    prompts = [build_prompt_ids(tokenizer, settings.template, t, None, 256) for t in texts]
    assert max(map(len, prompts)) >= 4 * min(map(len, prompts))
    gen = GenerateConfig(do_sample=False, repetition_penalty=2.0)  # the original design's penalty
    refs = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, repetition_penalty=2.0,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id])
            refs.append(cut_at_stop(out[0, len(ids):].tolist(), [tokenizer.eos_token_id]))
    for batch_size in (1, 3, 8):
        assert generate_ids(model, tokenizer, prompts, gen, max_new_tokens=12, batch_size=batch_size) == refs


@pytest.mark.slow
def test_bundled_chat_with_no_flags_answers_paris_and_stops(capsys):
    """The defaults that work: no generation flag, the bundled model's own generation_config (greedy, no
    repetition penalty) gives a short answer naming Paris that ends with EOS well before the token limit."""
    from easysft.generate import generate_ids, resolve_settings
    from easysft.models.load import load_model_and_tokenizer

    assert main(["chat", "--model_name_or_path", "bundled", "--prompt", "What is the capital of France?"]) == 0
    answer = capsys.readouterr().out.strip()
    assert "Paris" in answer and len(answer) < 80, answer
    model, tokenizer, resolved = load_model_and_tokenizer("bundled")
    settings = resolve_settings(resolved.meta, tokenizer, {})
    prompt = settings.template.prompt_ids(tokenizer, "What is the capital of France?")
    # generate_ids cuts at EOS (excluded): far fewer ids than the limit means the answer ended with EOS
    ids = generate_ids(model.eval(), tokenizer, [prompt], settings.generation,
                       max_new_tokens=settings.max_new_tokens)[0]
    assert len(ids) < settings.max_new_tokens // 4 and tokenizer.decode(ids).strip() == answer
