"""The default model at 4 bits: prepared from the shipped GGUF on first use (the dense checkpoint,
then the compressed-tensors one), served by a streaming engine, it answers a chat question the
way the dense model would (its answer, scored by the dense fp32 model, is a likely one)."""
import gc

QUESTION = "What is the capital of France?"


def test_q4_default_model_answers_a_chat():
    from conftest import prompt_nlls, tiny_engine
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from streamsink.serving.engine import make_llm
    from streamsink.serving.engine_args import choose_model

    q4 = choose_model(None, "q4")
    assert q4.path.endswith("-q4") and q4.dtype == "bfloat16"
    llm = make_llm(None, streamsink={}, weights="q4", enforce_eager=True, max_num_seqs=2)
    (out,) = llm.chat([{"role": "user", "content": QUESTION}],
                      SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
    answer = out.outputs[0]
    prompt = list(out.prompt_token_ids)
    del llm
    gc.collect()
    assert answer.text.strip()
    dense = choose_model(None, "fp32").path
    judge = tiny_engine(dense, None, max_model_len=256)
    nlls = prompt_nlls(judge, [prompt + list(answer.token_ids)])[0][len(prompt) - 1:]
    del judge
    gc.collect()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    assert sum(nlls) / len(nlls) < 1.0, tokenizer.decode(answer.token_ids)
