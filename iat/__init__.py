"""ImageNet adversarial training and robustness evaluation (the package behind ``main.py``).

One module per decision; the map is in README.md ("Layout"). Importing the package imports
nothing heavy: the data-server side (``iat.data.layouts``, ``augment``, ``sampling``,
``protocol``, ``client``, ``server``) never imports torch.
"""

import os

from iat.runtime.cpus import usable_cpus


def openmp_wait_policy(load: float, cpus: int) -> str | None:
    """The OpenMP wait policy for a machine with `load` runnable processes (the 1-minute load
    average) on `cpus` usable CPUs: "PASSIVE" when it is oversubscribed (a load of at least
    twice the CPUs: a machine merely kept full, e.g. by this project's own previous run, stays
    below), else None (OpenMP's default).

    bench/shared_machine.py, a PGD iteration of the demo's ResNet on 2 CPUs: spinning 12.0 ms
    quiet, 140 ms beside 4 busy processes (x11.6; a load of 11 gave 2,100-5,600 ms); passive
    23.8 ms quiet (its threads sleep between the many small operators), 58 ms busy (x2.4, what
    one thread gets); the demo's strong-100 on 32 images, quiet: 8.8 s spinning, 18.2 s
    passive. So passive only where the machine is oversubscribed."""
    return "PASSIVE" if load >= 2 * cpus else None


def _choose_openmp_wait_policy() -> None:
    """Applied once, on import, before torch loads OpenMP (which reads it once); a user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    policy = openmp_wait_policy(os.getloadavg()[0], usable_cpus())
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy


_choose_openmp_wait_policy()
