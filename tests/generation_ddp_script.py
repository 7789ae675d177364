"""Decode 5 prompts with a tiny random causal LM through vbshare's Engine and write the gathered answers (rank 0):
run alone or under torchrun by tests/test_generation.py (2 processes must give what 1 gives, in order)."""
import json
import sys
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vbshare.assets import minilm_dir
from vbshare.data.encoding import Encoded
from vbshare.data.examples import Decoding
from vbshare.train.engine import Engine
from vbshare.train.generation import generate_split

torch.set_num_threads(1)
engine = Engine(SimpleNamespace(precision="fp32", strategy="ddp", device="cpu", compile=False))
tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                     max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)).eval()
texts = ["one", "two words", "three words here", "and a fourth prompt", "fifth"]
prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
data = Encoded(prompts, None, prompts=prompts, references=texts)
answers = generate_split(model, tokenizer, data, Decoding(metrics=("rouge_l",), max_new_tokens=6), engine, batch_size=1)
if engine.is_main:
    with open(sys.argv[1], "w") as handle:
        json.dump(answers, handle)
engine.end()
