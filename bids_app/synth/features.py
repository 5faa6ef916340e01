"""Switches for the synthetic engine's realism features, for ablations.

The engine is judged on real scans, not on itself (issue #4): a realism feature stays only when
a model trained without it scores no better. :class:`Features` turns one group of features off at
a time. ``evaluation/engine_ablation.py`` trains one base-8 U-Net per entry of :data:`ABLATIONS`
(``conus train --engine NAME``) and scores each on real scans and on a held-out phantom family.

The ablation (``docs/results/engine_ablation.json``) kept every feature but the scanner artefacts:
two seeds without them beat all three seeds of the full engine on both scores, so the default
engine (:data:`DEFAULT`, ``--engine default``) leaves them out. ``--engine full`` is every feature
on: the engine the ablation's arms were measured against and the models shipped before the switch
(``seg-general``, ``centerline-coarse``, ``spine-coarse`` 1.0.0) were trained on; same seed, same
bytes as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Features:
    """Which realism features the engine draws (all but the artefacts by default).

    - ``artefacts``: ghosting, motion and wrap-around along the phase axis (bias field and Rician
      noise stay: they are the SynthSeg baseline). Off by default: the ablation found them harmful.
    - ``extra_tissues``: the tissues built beyond PAM50's cord, CSF and spine mask get their own
      intensities: cauda equina roots and filum (else CSF), disc annulus/nucleus, vertebral body vs
      posterior elements vs sacrum (else one bone intensity), epidural fat, paraspinal muscle,
      subcutaneous fat, ligaments, cortical rim, muscle texture and CSF flow voids (else each soft
      tissue takes the intensity of a random background blob, as in a plain SynthSeg generator).
    - ``size_variation``: cord cross-section 0.6-2.5x the template's area with its own AP/RL ratio,
      dural sac 0.8-1.4x and the lumbar enlargement (else the template's sizes).
    - ``deformation``: lordosis/kyphosis/scoliosis, length, tilt and the elastic field (else a
      straight, untilted spine of template length).
    - ``acquisition``: the simulated acquisition (sagittal / axial thick slices / isotropic: PSF
      blur, averaging over each acquired voxel, sampling and interpolation back); else the image
      is made directly on the working grid (an isotropic scan at the working resolution).
    """

    artefacts: bool = False
    extra_tissues: bool = True
    size_variation: bool = True
    deformation: bool = True
    acquisition: bool = True

    def off(self) -> list[str]:
        """Names of the features turned off."""
        return [name for name, on in self.__dict__.items() if not on]


#: the engine's default: every feature the ablation kept
DEFAULT = Features()
#: every realism feature on (the ablation's reference and the engine of the first shipped models)
FULL = Features(artefacts=True)

#: named engine variants (``conus train --engine NAME``): the default, the full engine and the
#: ablation's arms, each one feature off the full engine (``no-artefacts`` is the default's features)
ABLATIONS: dict[str, Features] = {
    "default": DEFAULT,
    "full": FULL,
    "no-artefacts": replace(FULL, artefacts=False),
    "no-extra-tissues": replace(FULL, extra_tissues=False),
    "no-size-variation": replace(FULL, size_variation=False),
    "no-deformation": replace(FULL, deformation=False),
    "no-acquisition": replace(FULL, acquisition=False),
    # a plain SynthSeg-style generator like the prototype: PAM50 cord / CSF / spine mask and
    # background blobs, with deformations and the simulated acquisition, nothing else
    "plain": Features(artefacts=False, extra_tissues=False, size_variation=False),
}


def features_named(name: str) -> Features:
    """The :class:`Features` of an :data:`ABLATIONS` entry (ValueError names the choices)."""
    try:
        return ABLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown engine variant {name!r}; expected one of {sorted(ABLATIONS)}") from None
