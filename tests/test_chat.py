"""Chat templates (infer/chat.py), the terminal chat, and embeddings (infer/embed.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import varied_model

from glm130b.infer.chat import (
    CHATGLM6B,
    CHATGLM6B_CPP,
    PLAIN,
    ChatError,
    encode_chat,
    fit_history,
    render,
    template_of,
)
from glm130b.infer.embed import embed
from glm130b.tokenizer import default_tokenizer

CHATGLM_REFERENCE = Path(__file__).parent / "fixtures" / "chatglm6b" / "generation_reference.json"


def test_chatglm_cpp_template_renders_the_peers_prompts():
    """chatglm.cpp 0.4.2's own chat prompts (in the ChatGLM reference) come out of our template."""
    cases = [c for c in json.loads(CHATGLM_REFERENCE.read_text())["cases"] if c["kind"] == "chat"]
    assert len(cases) == 2
    for case in cases:
        assert render(CHATGLM6B_CPP, case["messages"]) == case["prompt_text"], case["name"]


def test_chatglm_hf_template_and_plain():
    talk = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "再见"}]
    assert render(CHATGLM6B, talk[:1]) == "你好"  # one message: the query as it is (HF build_prompt)
    assert render(CHATGLM6B, talk) == "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答："
    system = [{"role": "system", "content": "Be brief."}] + talk[:1]
    assert render(PLAIN, system) == "Be brief.\n\nQuestion: 你好\nAnswer:"


def test_typed_control_strings_stay_text():
    tok = default_tokenizer()
    ids = encode_chat(tok, PLAIN, [{"role": "user", "content": "fill [MASK] then <eop> <sop> [gMASK]"}])
    assert ids[-1] == tok.gmask_id and not any(i < 8 for i in ids[:-1])  # the only special id is ours


def test_bad_messages():
    for messages, needle in (([], "at least one"), ([{"role": "assistant", "content": "hi"}], "last message"),
                             ([{"role": "robot", "content": "x"}], "role")):
        with pytest.raises(ChatError, match=needle):
            render(PLAIN, messages)


@pytest.mark.parametrize("text,needle", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{% for m in messages %}", "Unexpected end of template"),
    ("{{ \"a\" + 1 }}", "TypeError"),
    ("{% if false %}x{% endif %}", "renders a conversation as empty text"),
])
def test_a_broken_template_fails_when_loaded_not_per_request(tmp_path, text, needle):
    path = tmp_path / "t.jinja"
    path.write_text(text)
    with pytest.raises(ChatError, match=needle) as caught:
        template_of(None, None, str(path))
    assert str(path) in str(caught.value)
    config = tmp_path / "model"
    config.mkdir()
    (config / "tokenizer_config.json").write_text(json.dumps({"chat_template": text}))
    with pytest.raises(ChatError, match="tokenizer_config.json"):
        template_of(config)


def test_templates_may_refuse_a_conversation_with_raise_exception(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text('{% for m in messages %}{% if m.role == "system" %}{{ raise_exception("no system role") }}'
                    "{% endif %}{{ m.content }}{% endfor %}")
    template = template_of(None, None, str(path))  # the sample conversation has no system message
    assert render(template, [{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(ChatError, match="no system role"):
        render(template, [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])


def test_long_history_drops_the_oldest_exchanges():
    tok = default_tokenizer()
    system = {"role": "system", "content": "S"}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    messages = [system] + turns + [{"role": "user", "content": "last"}]
    full = len(encode_chat(tok, PLAIN, messages))
    ids = fit_history(tok, PLAIN, messages, lambda n: n <= full // 2)
    text = tok.decode(ids[:-1])
    assert len(ids) <= full // 2 and text.startswith("S") and text.endswith("Question: last\nAnswer:")
    assert "question 0" not in text and "question 5" in text  # the oldest went first
    one = fit_history(tok, PLAIN, messages, lambda n: False)  # nothing fits: system + the last question
    assert tok.decode(one[:-1]) == "S\n\nQuestion: last\nAnswer:"


def test_embeddings_are_unit_mean_pooled_and_batch_independent():
    model = varied_model("1d", seed=3)
    a, b = [5, 9, 11, 40], [7, 8]
    together = embed(model, [a, b])
    alone = embed(model, [b])
    assert all(abs(v.norm().item() - 1) < 1e-5 for v in together)
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)  # padding never leaks in
    with torch.no_grad():
        h = model.final_layernorm(model.run_blocks(model.embed(torch.tensor([a])), torch.arange(4).view(1, -1),
                                                   torch.ones(1, 1, 4, 4, dtype=torch.bool)))
    torch.testing.assert_close(together[0], torch.nn.functional.normalize(h[0].mean(0), dim=0), atol=1e-5, rtol=1e-5)


def test_terminal_chat_streams_resets_and_exits():
    """The verb driven through its standard input: two answers, a reset, /exit, exit 0."""
    out = subprocess.run([sys.executable, "-m", "glm130b", "chat", "--max-new-tokens", "6", "--system", "Be kind."],
                         input="In the beginning\n/reset\n起初\n/exit\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("glm> ") == 2 and "(conversation reset)" in out.stderr


def test_a_line_that_is_not_utf8_is_said_and_the_chat_goes_on():
    out = subprocess.run([sys.executable, "-m", "glm130b", "chat", "--max-new-tokens", "3"],
                         input=b"bad \xff line\nIn the beginning\n/exit\n", capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert b"not valid UTF-8" in out.stderr and out.stdout.count(b"glm> ") == 1


def test_terminal_chat_in_tmux_ctrl_c_stops_an_answer_not_the_chat(tmp_path):
    """Driven as a person would, in tmux: Ctrl-C during an answer stops it and the chat goes on."""
    import shutil
    import time

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    session = f"glmchat{id(tmp_path) % 100000}"
    command = f"{sys.executable} -m glm130b chat --max-new-tokens 240 --min-new-tokens 240; echo EXITED $?; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)

    def pane() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-200", "-t", session], capture_output=True,
                              text=True).stdout

    def keys(*k) -> None:
        subprocess.run(["tmux", "send-keys", "-t", session, *k], check=True)

    def wait_for(text: str, timeout: float = 120.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in pane():
                return True
            time.sleep(0.05)
        return False

    try:
        assert wait_for("you>"), pane()
        stopped = False
        for _ in range(5):  # an answer that ends before the key arrives is simply tried again
            keys("In the beginning", "Enter")
            assert wait_for("glm>", 60)
            time.sleep(0.15)
            keys("C-c")
            time.sleep(0.5)
            if "[stopped]" in pane():
                stopped = True
                break
        assert stopped, pane()
        assert pane().rstrip().endswith("you>"), pane()  # back at the prompt, still chatting
        keys("/exit", "Enter")
        assert wait_for("EXITED 0", 30), pane()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
