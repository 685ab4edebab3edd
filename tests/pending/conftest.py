"""Tests written ahead of the code or model they need; none is collected until its issue lands.

``test_demo_generalises.py`` asserts issue 17's thresholds on the held-out generator. The shipped demo model is the
v2 one (``small4 train-demo --curriculum v2``), and it still fails them (README: sums 0.75-0.80, unseen tools with the
right arguments 0.18). The session whose model meets them removes the file from ``collect_ignore`` (or moves it to
``tests/server/``).
"""

collect_ignore = ["test_demo_generalises.py"]
