#!/bin/bash
cd /work/ci-check7 && grep SigIgn /proc/self/status > /tmp/sigexp-a.log; timeout 600 nice -n 5 .venv/bin/python -m pytest -q -x "tests/flows/test_cli_stop.py::test_stop_is_prompt_and_the_store_resumes[ctrl-c]" -p no:cacheprovider >> /tmp/sigexp-a.log 2>&1; echo "rc=$?" >> /tmp/sigexp-a.log
cd /work/main && grep SigIgn /proc/self/status > /tmp/sigexp-b.log; timeout 600 nice -n 5 .venv/bin/python -m pytest -q -x "tests/flows/test_cli_stop.py::test_stop_is_prompt_and_the_store_resumes[ctrl-c]" -p no:cacheprovider >> /tmp/sigexp-b.log 2>&1; echo "rc=$?" >> /tmp/sigexp-b.log
