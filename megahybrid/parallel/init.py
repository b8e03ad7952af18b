"""torch.distributed + Megatron model-parallel initialisation from the run config.

Launch modes: under torchrun (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK in the environment) or as
a single process (world 1, rendezvous through a FileStore in a temporary directory, so no port is needed). Backend:
`parallel.backend` (auto = nccl when CUDA is present, else gloo); on CPU the Megatron CUDA shim is applied.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megahybrid.config.schema import RunConfig
from megahybrid.parallel import collectives, cpu_shim


@dataclass
class ParallelState:
    """This process's place in the TP x PP x DP layout and the groups that communicate along each axis."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vpp_size: int | None
    is_first_stage: bool
    is_last_stage: bool
    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    """Model-parallel group (TP x PP of one data-parallel replica)."""
    device: torch.device
    backend: str
    owns_process_group: bool = False
    shim_applied: bool = False
    check_installed: bool = False
    _tmpdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def is_data_parallel_main(self) -> bool:
        """Rank 0 of its model-parallel group's first replica (writes files other ranks only read)."""
        return self.dp_rank == 0 and self.tp_rank == 0 and self.pp_rank == 0

    @property
    def last_stage_global_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline (source of broadcasts over pp_group)."""
        return dist.get_global_rank(self.pp_group, self.pp_size - 1)

    def destroy(self, *, keep_process_group: bool = False) -> None:
        """Tear down Megatron's groups, the default process group (if `init_distributed` created it and
        `keep_process_group` is False) and the CPU shim. Keep the process group to re-initialise at another
        TP/PP layout in the same processes (torch.distributed cannot be re-initialised reliably)."""
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if keep_process_group:
            return
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        if self.check_installed:
            collectives.uninstall_check()
        if self.shim_applied:
            cpu_shim.undo()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def _backend(cfg: RunConfig) -> str:
    backend = cfg.parallel.backend
    cuda = torch.cuda.is_available()
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise RuntimeError("parallel.backend: 'nccl' needs CUDA, but torch.cuda.is_available() is False on this "
                           "machine; use 'gloo' or 'auto'")
    return backend


def _init_process_group(backend: str) -> tuple[bool, tempfile.TemporaryDirectory | None]:
    """Initialise torch.distributed unless it already is; returns (created_here, tmpdir_to_clean)."""
    if dist.is_initialized():
        return False, None
    timeout = datetime.timedelta(minutes=float(os.environ.get("MEGAHYBRID_DIST_TIMEOUT_MIN", "30")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
        return True, None
    tmp = tempfile.TemporaryDirectory(prefix="megahybrid-dist-")
    store = dist.FileStore(os.path.join(tmp.name, "store"), 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return True, tmp


def _check_layout(cfg: RunConfig, world: int) -> None:
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if world % (tp * pp):
        raise ValueError(f"parallel: world size {world} is not divisible by tensor_model_parallel_size * "
                         f"pipeline_model_parallel_size = {tp}*{pp}")
    if par.data_parallel_size is not None and par.data_parallel_size * tp * pp != world:
        raise ValueError(f"parallel.data_parallel_size ({par.data_parallel_size}) * TP ({tp}) * PP ({pp}) != world "
                         f"size {world}")
    if par.world_size is not None and par.world_size != world:
        raise ValueError(f"parallel.world_size ({par.world_size}) != the launcher's world size ({world})")


def init_distributed(cfg: RunConfig, *, seed: int | None = None) -> ParallelState:
    """Initialise torch.distributed and Megatron's model-parallel groups; seed the model-parallel RNG.

    `seed` defaults to `cfg.train.seed`. Idempotent with respect to torch.distributed (an existing default group
    is reused); Megatron's groups are (re)created.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = _backend(cfg)
    created, tmp = _init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_layout(cfg, world)
    cuda = backend == "nccl"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    shim = (not torch.cuda.is_available()) and not cpu_shim.is_applied()
    if not torch.cuda.is_available():
        cpu_shim.apply()
    # after the shim: the check's mode must see `device="cuda"` before the shim maps it to the CPU
    check = collectives.check_requested() and not collectives.CHECK.installed
    if collectives.check_requested():
        collectives.install_check()

    par = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=True)
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    # CPU: the inference tracker's fork() is a no-op, so nothing touches the (absent) CUDA generator.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=not cuda, force_reset_rng=True)

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    return ParallelState(
        rank=rank, world_size=world,
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=pp_rank, pp_size=pp_size, vpp_size=par.virtual_pipeline_model_parallel_size,
        is_first_stage=pp_rank == 0, is_last_stage=pp_rank == pp_size - 1,
        dp_group=parallel_state.get_data_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        mp_group=parallel_state.get_model_parallel_group(),
        device=device, backend=backend, owns_process_group=created, shim_applied=shim,
        check_installed=check, _tmpdir=tmp)
