"""DPO with the fused loss split over processes: sequence-parallel, vocabulary-parallel, or both (2 x 2).

    torchrun --standalone --nproc_per_node=2 examples/parallel_dpo.py --layout sequence
    torchrun --standalone --nproc_per_node=2 examples/parallel_dpo.py --layout vocab
    torchrun --standalone --nproc_per_node=4 examples/parallel_dpo.py --layout grid

A tiny token model (embedding -> MLP -> LM head, random init) learns to prefer one synthetic completion style over
another. `sequence`: each rank holds a contiguous slice of every sequence's tokens (as context parallelism leaves
them) and the whole head; the rank's parameter gradients cover its tokens only, so they are summed over the group.
`vocab`: each rank holds all tokens and its own rows of the LM head (as tensor parallelism leaves them); the
fused loss returns the full hidden-state gradient on every rank, so the trunk's gradients are already complete.
`grid`: both, on 4 ranks. Runs on CPU with gloo (or CUDA with nccl).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import prefopt

VOCAB, HIDDEN, PAIRS, LENGTH, PROMPT = 50, 32, 4, 24, 6


def synthetic_batch(step):
    """Chosen completions use the even token ids, rejected ones the odd ids; prompts are shared. The same batch on
    every rank (seeded by the step)."""
    gen = torch.Generator().manual_seed(1000 + step)
    prompt = torch.randint(0, VOCAB, (PAIRS, PROMPT), generator=gen)
    chosen = torch.randint(0, VOCAB // 2, (PAIRS, LENGTH - PROMPT), generator=gen) * 2
    rejected = torch.randint(0, VOCAB // 2, (PAIRS, LENGTH - PROMPT), generator=gen) * 2 + 1
    input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])  # [2P, T]
    labels = input_ids.roll(-1, dims=1)                 # label t is the token after t
    labels[:, :PROMPT - 1] = -100                        # no loss on the prompt ...
    labels[:, -1] = -100                                 # ... nor past the end
    return input_ids, labels


class Trunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh())

    def forward(self, input_ids):
        return self.mlp(self.embed(input_ids))


def groups(layout, rank, world):
    """-> (sequence group, its rank, its size, vocabulary group, its rank, its size); None = not split."""
    whole = dist.group.WORLD
    if layout == "sequence":
        return whole, rank, world, None, 0, 1
    if layout == "vocab":
        return None, 0, 1, whole, rank, world
    if world != 4:
        raise SystemExit("--layout grid needs 4 processes (2 sequence slices x 2 vocabulary shards)")
    sequence_groups = [dist.new_group([2 * v, 2 * v + 1]) for v in range(2)]   # every rank creates every group
    vocab_groups = [dist.new_group([s, 2 + s]) for s in range(2)]
    return sequence_groups[rank // 2], rank % 2, 2, vocab_groups[rank % 2], rank // 2, 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=("sequence", "vocab", "grid"), default="sequence")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    sequence_group, sequence_rank, sequence_world, vocab_group, vocab_rank, vocab_world = \
        groups(args.layout, rank, world)

    torch.manual_seed(0)  # the same initial model on every rank
    trunk = Trunk().to(device)
    full_head = torch.randn(VOCAB, HIDDEN) * 0.1
    rows = torch.tensor_split(torch.arange(VOCAB), vocab_world)[vocab_rank]   # this rank's vocabulary rows
    head = torch.nn.Parameter(full_head[rows].clone().to(device))
    reference_trunk = Trunk().to(device).requires_grad_(False)
    reference_trunk.load_state_dict(trunk.state_dict())
    reference_head = head.detach().clone()
    optimizer = torch.optim.Adam([*trunk.parameters(), head], lr=args.lr)

    for step in range(args.steps):
        input_ids, labels = synthetic_batch(step)
        tokens = torch.tensor_split(torch.arange(LENGTH), sequence_world)[sequence_rank]  # this rank's slice
        input_ids, labels = input_ids.to(device), labels[:, tokens].to(device)
        # The trunk sees every token (a real context-parallel model exchanges keys/values instead); the loss
        # sees only this rank's slice.
        hidden = trunk(input_ids)[:, tokens]
        with torch.no_grad():
            reference_hidden = reference_trunk(input_ids)[:, tokens]
        loss, metrics = prefopt.fused_linear_preference_loss(
            hidden, head, labels, ref_hidden=reference_hidden, ref_weight=reference_head, loss_type="sigmoid",
            beta=0.1, sequence_parallel_group=sequence_group, vocab_parallel_group=vocab_group)
        optimizer.zero_grad()
        loss.backward()
        if sequence_group is not None:   # each slice's part of the parameter gradients
            for parameter in [*trunk.parameters(), head]:
                dist.all_reduce(parameter.grad, group=sequence_group)
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  rewards/margins {metrics['rewards/margins'].item():+.4f}"
                  f"  rewards/accuracies {metrics['rewards/accuracies'].item():.2f}", flush=True)
    summary = torch.tensor([loss.item(), metrics["rewards/margins"].item()], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(summary) for _ in range(world)]
    dist.all_gather(gathered, summary)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"layout {args.layout}: {world} ranks, final loss {summary[0]:.4f}, every rank the same loss: {same}")
    prefopt.parallel.destroy_process_group()  # dist's, plus a pause so gloo's threads cannot abort the exit
    return summary.tolist()


if __name__ == "__main__":
    main()
