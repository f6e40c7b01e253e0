import os

from hypothesis import HealthCheck, settings

# A few hundred examples in the default suite; HYPOTHESIS_PROFILE=thorough runs 10,000.
settings.register_profile("default", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=10_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
