"""
plumbing/mesh.py -- who holds which experts: the (dp, ep) mesh.

W = dp x ep processes sit in a grid of dp rows and ep columns, rank
r = row * ep + column (the row-major order of init_device_mesh). A row is an
expert-parallel group: its ep ranks share the E experts out between them
and exchange tokens among themselves. A column is a data-parallel group:
its dp ranks hold the same experts and average their gradients. Rows are
consecutive ranks, so with ep = GPUs per node the token exchange never
leaves a node; only gradient averaging crosses nodes.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class MeshLayout:
    """The grid as lists of ranks; a pure function of (world_size, ep_size),
    so a test can check a 32-process layout without starting 32 processes."""
    world_size: int
    ep_size: int

    @property
    def dp_size(self):
        return self.world_size // self.ep_size

    def ep_rank(self, rank):
        return rank % self.ep_size

    def dp_rank(self, rank):
        return rank // self.ep_size

    def ep_groups(self):
        """The rows: the ranks that exchange tokens with each other."""
        return [list(range(d * self.ep_size, (d + 1) * self.ep_size)) for d in range(self.dp_size)]

    def dp_groups(self):
        """The columns: the ranks that hold the same experts."""
        return [list(range(e, self.world_size, self.ep_size)) for e in range(self.ep_size)]

    def experts_of(self, rank, n_experts):
        """The experts rank `rank` holds: a contiguous range, the same in every row."""
        n = n_experts // self.ep_size
        return range(self.ep_rank(rank) * n, (self.ep_rank(rank) + 1) * n)


@dataclass(frozen=True)
class Mesh:
    """This process's place in the grid, and the two process groups it talks
    over (torch.distributed ProcessGroups; None for a single process). Built
    by plumbing.Proc.start; the default is one process. Passed to the model
    explicitly: nothing here is global."""
    rank: int = 0
    world_size: int = 1
    ep_size: int = 1
    ep_group: object = None       # my row: the all-to-all and the expert-norm sum run here
    dp_group: object = None       # my column: expert gradients are summed here
    grid: object = None           # the whole grid as PyTorch's DeviceMesh (checkpoints name shards by it)

    @property
    def layout(self):
        return MeshLayout(self.world_size, self.ep_size)

    @property
    def ep_rank(self):
        return self.layout.ep_rank(self.rank)

    @property
    def dp_size(self):
        return self.layout.dp_size
