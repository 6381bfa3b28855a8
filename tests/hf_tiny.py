"""Helpers shared by the Hugging Face test files (test_hf_generate_paths.py,
test_hf_model_tests.py): tiny random causal LMs on the same weights under several attention
implementations, left / right padded batches of random tokens, a logit error relative to scale."""
from __future__ import annotations

import copy

import torch


def tiny_config_kwargs(vocab, pad, max_positions):
    """Config kwargs of a tiny LLaMA-shaped model: 2 layers, hidden 64, 4 heads / 2 kv heads."""
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=max_positions, pad_token_id=pad, bos_token_id=1,
                eos_token_id=2)


def same_weight_models(transformers, fa_hf, cfg, dtype=torch.float32, skip_sdpa=False):
    """{"eager", "sdpa" (unless skip_sdpa: transformers refuses SDPA for soft-capped Gemma 2),
    "fastattn"} models of ``cfg`` on the same random weights (seed 0), in eval mode and
    ``dtype``; the fastattn one set up as the README says (register + patch_model)."""
    fa_hf.register()
    torch.manual_seed(0)
    state = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).state_dict()
    out = {}
    for impl in ("eager", "sdpa", "fastattn"):
        if impl == "sdpa" and skip_sdpa:
            continue
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
        m.load_state_dict(state)
        m = m.to(dtype).eval()
        if impl == "fastattn":
            fa_hf.patch_model(m)
        out[impl] = m
    return out


def padded(lens, vocab, pad, side="left", seed=1):
    """(ids, attention_mask) of len(lens) rows of random tokens 3..vocab-1, row b holding lens[b]
    real tokens on the right (side="left": left padding) or on the left; padding ids = pad."""
    S = max(lens)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lens), S), generator=g)
    mask = torch.zeros(len(lens), S, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, slice(S - n, S) if side == "left" else slice(0, n)] = 1
    ids[mask == 0] = pad
    return ids, mask


def rel_err(mine, theirs):
    """max |mine - theirs| over the scale of theirs (at least 1), in fp32."""
    mine, theirs = mine.float(), theirs.float()
    return ((mine - theirs).abs().max() / max(theirs.abs().max().item(), 1.0)).item()


class GraphCapture:
    """A torch.compile backend that keeps the FX graphs and runs them as traced (no inductor);
    targets() lists the functions they call, nested subgraphs included."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        out = []
        for g in self.graphs:
            for mod in g.modules():
                if isinstance(mod, torch.fx.GraphModule):
                    out += [str(n.target) for n in mod.graph.nodes if n.op == "call_function"]
        return out
