"""W0 in host memory: where the frozen copies live when ``reference_on_host`` is set."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from mt_osft.reference import to_host


def test_a_sharded_w0_stays_on_the_host_whatever_its_mesh_device():
    """A DTensor's W0 keeps its mesh, placements and shape with its shard on the host. The mesh
    here says "cuda" (built without a GPU: no backend is initialised for it), as an FSDP2
    run's on GPUs does: made with DTensor.from_local, which moves a local tensor to its mesh's
    device type, every W0 went back to the GPU (13 GiB at 8B; here: no NVIDIA driver)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cuda", [0], _init_backend=False)
        weight = torch.randn(6, 4)
        meta = TensorMeta(weight.shape, weight.stride(), weight.dtype)
        sharded = DTensor(weight, DTensorSpec(mesh, (Shard(0),), meta), requires_grad=False)
        host = to_host(sharded)
        assert isinstance(host, DTensor) and host.to_local().device.type == "cpu"
        assert host.device_mesh is mesh and host.placements == (Shard(0),)
        assert host.shape == weight.shape and torch.equal(host.to_local(), weight)
    finally:
        if started:
            dist.destroy_process_group()
