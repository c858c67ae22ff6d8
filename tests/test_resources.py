"""The resource governor's control logic, driven by a fake clock and fake measurements."""

import pytest

from minigpt.resources import MEMORY_PAUSES, ResourceGovernor


class FakeMachine:
    """A process that burns `busy_cores` cores while running; sleeping uses no CPU."""

    def __init__(self, busy_cores: float):
        self.now = 0.0
        self.cpu = 0.0
        self.busy_cores = busy_cores
        self.memory = 50.0
        self.released = 0

    def run(self, seconds: float) -> None:
        self.now += seconds
        self.cpu += seconds * self.busy_cores

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def governor(self, **limits) -> ResourceGovernor:
        return ResourceGovernor(cpu_count=4, clock=lambda: self.now, sleep=self.sleep, cpu_seconds=lambda: self.cpu,
                                memory_percent=lambda: self.memory, release_memory=self.release, **limits)

    def release(self) -> None:
        self.released += 1


@pytest.mark.parametrize("limit", [25.0, 50.0, 75.0])
def test_cpu_share_is_held_at_the_limit(limit):
    machine = FakeMachine(busy_cores=4)  # flat out: 100% of a 4-core machine
    governor = machine.governor(max_cpu_percent=limit)
    for _ in range(200):
        machine.run(0.1)  # one training step
        assert governor.after_step()
    share = 100 * machine.cpu / (machine.now * 4)
    assert share == pytest.approx(limit, rel=0.05)


def test_no_pause_when_already_under_the_limit():
    machine = FakeMachine(busy_cores=1)  # 25% of the machine
    governor = machine.governor(max_cpu_percent=50.0)
    for _ in range(50):
        machine.run(0.1)
        governor.after_step()
    assert governor.paused_seconds == 0.0


def test_memory_warning_then_relief_then_stop(caplog):
    machine = FakeMachine(busy_cores=1)
    governor = machine.governor(max_memory_percent=80.0)
    machine.memory = 77.0
    assert governor.after_step()
    assert "close to the --max-memory limit" in caplog.text
    machine.memory = 85.0
    original_release = machine.release

    def release_that_helps():
        original_release()
        machine.memory = 70.0

    machine.release = release_that_helps
    governor.release_memory = machine.release
    assert governor.after_step()  # freeing caches brought it back under
    assert machine.released == 1
    machine.memory = 95.0
    governor.release_memory = original_release
    assert not governor.after_step()  # still over after every pause: stop
    assert machine.released == 1 + MEMORY_PAUSES


def test_no_limits_means_no_measurement_and_no_pause():
    machine = FakeMachine(busy_cores=4)
    governor = machine.governor()
    machine.memory = 99.0
    machine.run(5.0)
    assert governor.after_step() and governor.paused_seconds == 0.0
