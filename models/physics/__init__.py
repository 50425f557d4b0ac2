"""CT physics, kept apart from the networks: geometry, projectors and low-dose simulation.

Modules (import the one you need; this package imports nothing heavy by itself):

* :mod:`models.physics.geometry`: :class:`~models.physics.geometry.ParallelBeamGeometry`, the
  2D parallel-beam scanner description and the image/angle/detector conventions.
* :mod:`models.physics.fan_geometry`: :class:`~models.physics.fan_geometry.FanBeamGeometry`,
  fan beam with an equiangular (curved) or flat detector, source and fan-angle conventions.
* :mod:`models.physics.projector`: the :class:`~models.physics.projector.Projector` protocol
  (forward projection, its exact adjoint, filtered backprojection), the default torch backend
  :class:`~models.physics.projector.TorchParallelProjector` and
  :func:`~models.physics.projector.make_projector` (parallel or fan beam).
* :mod:`models.physics.fan_projector`: :class:`~models.physics.fan_projector.TorchFanProjector`
  (Joseph forward projection, exact adjoint, fan-beam FBP with cosine/distance and Parker
  weights); :mod:`models.physics.joseph` is the ray engine both torch projectors share, and
  :mod:`models.physics.pixel_adjoint` the gather form of the parallel-beam transpose.
* :mod:`models.physics.iterative`: SIRT, CGLS and TV (Chambolle-Pock) reconstruction with a
  data-consistency report.
* :mod:`models.physics.astra_backend`: an optional cross-check backend on the ASTRA toolbox
  (GPLv3, never imported unless asked for).
* :mod:`models.physics.lowdose`: HU <-> linear attenuation conversion, Poisson low-dose
  simulation with correlated (FBP-shaped) noise, and a body mask for metrics.
* :mod:`models.physics.cbct`: CBCT simulated from a CT volume (issue 7):
  :func:`~models.physics.cbct.simulate_cbct` with its parameters in
  :mod:`~models.physics.cbct_params` (geometry, artefacts, ``random_artefacts(seed)``), the
  LPS <-> RTK geometry and field of view in :mod:`~models.physics.cbct_geometry`, detector-side
  physics (scatter, cupping, noise) in :mod:`~models.physics.cbct_detector`, and the RTK (ITK)
  cone-beam projector and FDK in :mod:`~models.physics.cbct_rtk`, the only module importing ITK.

Units used throughout: images of linear attenuation in 1/mm, images in HU for CT slices,
lengths in mm, sinograms of line integrals (dimensionless, mm x 1/mm), angles in radians.
"""
