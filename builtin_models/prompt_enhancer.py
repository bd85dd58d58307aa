"""The built-in tiny prompt enhancer (``builtin:tiny-enhancer``): a Qwen2 causal LM with
random weights and a tokenizer built offline, so the enhancer's real code path (chat
template, ``generate``, decoding) runs in tests and in the embedded default. Its rewrites
are gibberish, as random weights are.
"""

from __future__ import annotations

from pathlib import Path

# Qwen's chat layout, for the tiny tokenizer (real instruct models ship their own template).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(work: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from builtin_models.parts import build_qwen_tokenizer, seeded

    tokenizer = build_qwen_tokenizer(work / "_tokenizer_src")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    seeded(0)
    model = Qwen2ForCausalLM(config).eval()
    # Random weights pick any byte; zeroing the (tied) embeddings of tokens that are not
    # printable text gives them a zero logit, so greedy decoding writes visible characters.
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if not text.strip() or not text.isprintable() or "\ufffd" in text:
                embeddings[token_id] = 0
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    import shutil

    shutil.rmtree(work / "_tokenizer_src")
    # model_index.json marks a complete built-in folder (builtin_models).
    (work / "model_index.json").write_text('{"_class_name": "Qwen2ForCausalLM"}\n')
