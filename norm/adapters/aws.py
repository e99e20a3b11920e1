"""What Norm's AWS clients share: a session whose default credential chain (environment, shared
files, the instance profile) reaches instance metadata at the configured address, bounded."""

from __future__ import annotations

from aiobotocore.session import AioSession, get_session


def session(metadata_url: str | None, timeout: float) -> AioSession:
    """A session for one client. `metadata_url` replaces the instance metadata address the
    instance-profile credentials are read from (IMDSv2); `timeout` bounds each metadata call."""
    s = get_session()
    if metadata_url is not None:
        s.set_config_variable("ec2_metadata_service_endpoint", metadata_url)
    s.set_config_variable("metadata_service_timeout", max(1, round(timeout / 2)))
    s.set_config_variable("metadata_service_num_attempts", 2)
    return s
