"""DPO in a plain PyTorch loop with prefopt's module form: no trainer, no logits.

A toy language model (embedding + GRU + output head) learns to prefer completions whose tokens are in
increasing order. Each step computes the final hidden states of the policy and of a frozen reference copy,
then hands them with the head weights to `prefopt.nn.FusedLinearPreferenceLoss`, which runs both heads,
the per-sequence sums and the DPO loss without materialising [tokens, vocab] logits.

    python examples/plain_pytorch_dpo.py --steps 60
"""
import argparse
import copy

import torch

import prefopt


class ToyLM(torch.nn.Module):
    def __init__(self, vocab_size=64, hidden_size=48):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.rnn = torch.nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)

    def hidden_states(self, input_ids):
        return self.rnn(self.embed(input_ids))[0]


def make_batch(n_pairs, prompt_len=4, completion_len=6, vocab_size=64, generator=None):
    """[2P, T] token ids (P chosen rows, then P rejected) and labels aligned with the hidden states."""
    prompt = torch.randint(0, vocab_size, (n_pairs, prompt_len), generator=generator)
    tokens = torch.randint(0, vocab_size, (n_pairs, completion_len), generator=generator)
    chosen = tokens.sort(dim=1).values                              # the preferred rule: increasing tokens
    rejected = tokens[:, torch.randperm(completion_len, generator=generator)]
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    labels = input_ids[:, 1:].clone()
    labels[:, : prompt_len - 1] = -100                              # score completion tokens only
    return input_ids[:, :-1], labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--loss_type", default="sigmoid")
    parser.add_argument("--beta", type=float, default=0.5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    policy = ToyLM()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    loss_fn = prefopt.nn.FusedLinearPreferenceLoss(loss_type=args.loss_type, beta=args.beta)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    history = []
    for step in range(1, args.steps + 1):
        input_ids, labels = make_batch(args.pairs, generator=generator)
        with torch.no_grad():
            ref_hidden = reference.hidden_states(input_ids)
        loss, metrics = loss_fn(policy.lm_head.weight, policy.hidden_states(input_ids), labels,
                                ref_hidden=ref_hidden, ref_weight=reference.lm_head.weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
        if step % 10 == 0 or step == 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  rewards/accuracies {metrics['rewards/accuracies']:.2f}"
                  f"  rewards/margins {metrics['rewards/margins']:.3f}")
    return history


if __name__ == "__main__":
    main()
