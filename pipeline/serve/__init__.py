"""HTTP serving of the ROI codec with Ray Serve: see :mod:`pipeline.serve.app` and docs/serving.md.

Import ``pipeline.serve.app`` for the deployments, :func:`~pipeline.serve.app.build_app`
(``serve run cluster/serve_config.yaml``) and :func:`~pipeline.serve.app.deploy`
(``jobs/deploy.py``); this package itself imports nothing heavy.
"""
