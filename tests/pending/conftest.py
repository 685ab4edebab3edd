"""Tests written ahead of the code or model they need; none is collected until its issue lands.

``test_demo_generalises.py`` asserts issue 17's thresholds on the held-out generator; today's shipped demo model
(the v1 curriculum) fails them. The session that ships the v2 demo model (``small4 train-demo``, see
``small4/demo_model/train.py``) removes it from ``collect_ignore`` (or moves it to ``tests/server/``).
"""

collect_ignore = ["test_demo_generalises.py"]
