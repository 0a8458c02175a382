"""A tiny Llama-architecture model directory for a real vLLM, built from nothing.

Run with the vLLM venv's Python (it needs `tokenizers`):
`.venv-vllm/bin/python tests/support/vllm_model.py DIR`. It writes `config.json`
(2 layers, hidden 128, ~1.4 M parameters), `tokenizer.json` (byte-level BPE
trained here on generated pseudo-words, so any text encodes) and
`tokenizer_config.json` (with a chat template). No weights: serve it with
`--load-format dummy` (random weights; send `ignore_eos` for exact lengths).

`words` is imported by the tests too (stdlib only), so their prompts are text of
the kind the tokenizer was trained on: about 4 characters a token.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

VOCAB = 4096
CONTEXT = 4096
SPECIAL = ["<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "gr",
    "pl",
    "sh",
    "st",
    "th",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ie", "oo", "ou"]


def words(rng: random.Random, count: int) -> str:
    """`count` pseudo-words of 1-3 syllables, space separated."""
    return " ".join(
        "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 3)))
        for _ in range(count)
    )


def build(directory: Path) -> None:
    # Only the vLLM venv has it: imported here, so the tests can import `words`.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(25)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((words(rng, 200) for _ in range(2000)), trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "model_max_length": CONTEXT,
                "chat_template": CHAT_TEMPLATE,
            }
        )
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": CONTEXT,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "bos_token_id": tokenizer.token_to_id("<s>"),
                "eos_token_id": tokenizer.token_to_id("</s>"),
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            }
        )
    )


if __name__ == "__main__":
    build(Path(sys.argv[1]))
