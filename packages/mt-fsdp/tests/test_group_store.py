"""Under torchrun each process group meets its peers under keys of its own in the agent's store
(a run called again in the same job must not read the last group's), and waits there for them
as long as the group's timeout says, not the store connection's."""

from __future__ import annotations

from datetime import timedelta

from torch.distributed.constants import default_pg_timeout

from mt_fsdp import distributed


def test_each_group_of_a_rank_has_keys_of_its_own(agent):
    first = distributed._fresh_group_store(0, timedelta(seconds=77))
    second = distributed._fresh_group_store(0, None)
    first.set("address", "of rank 0 in the first group")
    assert not second.check(["address"])
    # rank 1's first group is rank 0's first group: the ranks count their groups alike
    assert distributed._fresh_group_store(1, None).get("address") == b"of rank 0 in the first group"
    assert first.timeout == timedelta(seconds=77)
    assert second.timeout == default_pg_timeout  # torch's own, where the run sets none
    assert timedelta(seconds=77) != distributed.STORE_CONNECT_TIMEOUT  # (told apart)


def test_without_torchrun_torch_connects_the_group_itself(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed._fresh_group_store(0, None) is None
