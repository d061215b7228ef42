"""HTTP serving of the ROI codec with Ray Serve (docs/serving.md), one module per job:

- :mod:`~pipeline.serve.app`: :func:`~pipeline.serve.app.build_app` (``serve run
  cluster/serve_config.yaml``) and :func:`~pipeline.serve.app.deploy` (``jobs/deploy.py``);
- :mod:`~pipeline.serve.settings`: ``ServeSettings``, ``deployment_options`` (resources, autoscaling);
- :mod:`~pipeline.serve.deployments`: the model deployments ``CodecModel`` and ``MaskModel``;
- :mod:`~pipeline.serve.gateway`: the FastAPI ingress ``Gateway``;
- :mod:`~pipeline.serve.inputs`: HTTP input checks (upload limit, images, prompts, form fields);
- :mod:`~pipeline.serve.errors`: ``ApiError``, the one error body and exception handler.

This package itself imports nothing heavy.
"""
