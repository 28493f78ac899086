"""A following server finds the agent's announcements: it logs where it listens, takes the agent's announce
endpoint from the fetch reply, and says once when versions arrive only by polling."""

from __future__ import annotations

import logging

from ingest_support import free_port, wait_until

from cl_agent import follower as follower_module
from cl_agent.config import ServeSection
from cl_agent.fetch import FetchClient, ModelFetchService
from cl_agent.follower import RepositoryFollower, follower_from_config
from cl_agent.repository import Announcer, ModelRepository
from test_fetch import models, publish, source  # noqa: F401  (fixtures)


def test_the_versions_reply_names_the_agents_announce_endpoint_only_when_told(source, models):  # noqa: F811
    with ModelFetchService(source, "tcp://127.0.0.1:*", announce_endpoint="tcp://*:6001") as told, \
            ModelFetchService(source, "tcp://127.0.0.1:*") as untold:
        for service, expected in ((told, "tcp://*:6001"), (untold, None)):
            client = FetchClient(service.endpoint, "student", timeout_s=2.0)
            assert client.list_versions() == []
            assert client.agent_announce_endpoint == expected
            client.close()


def test_a_follower_subscribes_to_the_announce_port_the_agent_reports(tmp_path, source, models, caplog):  # noqa: F811
    publish(source, models[0])
    announcer = Announcer("tcp://127.0.0.1:*")
    port = announcer.endpoint.rsplit(":", 1)[1]
    wrong_default = f"tcp://127.0.0.1:{free_port()}"  # what this server's own config would have guessed
    edge = ModelRepository(tmp_path / "edge", "student")
    try:
        with ModelFetchService(source, "tcp://127.0.0.1:*", announce_endpoint=f"tcp://0.0.0.0:{port}") as service:
            serve = ServeSection(follow_fetch_endpoint=service.endpoint, follow_poll_s=30.0)
            follower = follower_from_config(serve, wrong_default, edge)
            with caplog.at_level(logging.INFO, logger="cl_agent.follower"), follower:
                assert wait_until(lambda: edge.latest_version() == 1, 10)
                assert wait_until(lambda: follower.announce_endpoint == announcer.endpoint, 5)
                # poll_s is 30 s: only an announcement on the learned endpoint brings version 2 this fast
                version = publish(source, models[1])
                assert wait_until(lambda: (announcer.announce("student", version, source.load_manifest(version)["sha256"])
                                           or edge.latest_version() == 2), 10, 0.1)
        said = caplog.text
        assert f"announcements from {wrong_default}" in said  # the start names where it listens
        assert f"subscribing to {announcer.endpoint} instead of {wrong_default}" in said
        assert follower.counters["announcements"] >= 1
        assert "not reaching this server" not in said  # version 2 was announced
    finally:
        announcer.close()


def test_an_explicit_announce_endpoint_is_kept_with_a_warning(tmp_path, source, caplog):  # noqa: F811
    with ModelFetchService(source, "tcp://127.0.0.1:*", announce_endpoint="tcp://*:6001") as service:
        explicit = f"tcp://127.0.0.1:{free_port()}"
        serve = ServeSection(follow_fetch_endpoint=service.endpoint, follow_announce_endpoint=explicit)
        follower = follower_from_config(serve, "tcp://127.0.0.1:5557", ModelRepository(tmp_path, "student"))
        with caplog.at_level(logging.INFO, logger="cl_agent.follower"), follower:
            assert wait_until(lambda: follower.counters["syncs"] >= 1 and "reports its announce endpoint" in caplog.text, 5)
    assert follower.announce_endpoint == explicit
    assert "serve.follow_announce_endpoint" in caplog.text and "tcp://127.0.0.1:6001" in caplog.text


def test_versions_found_only_by_polling_are_warned_about_once(tmp_path, source, models, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(follower_module, "SUBSCRIBED_S", 0.1)
    monkeypatch.setattr(follower_module, "ANNOUNCE_GRACE_S", 0.2)
    publish(source, models[0])
    silent = f"tcp://127.0.0.1:{free_port()}"  # nothing publishes there
    edge = ModelRepository(tmp_path / "edge", "student")
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        follower = RepositoryFollower(service.endpoint, silent, edge, poll_s=0.2, timeout_s=2.0)
        with caplog.at_level(logging.WARNING, logger="cl_agent.follower"), follower:
            assert wait_until(lambda: edge.latest_version() == 1, 10)
            assert wait_until(lambda: follower.counters["syncs"] >= 3, 5)  # a listing well after the subscription
            for model in models[1:3]:
                version = publish(source, model)
                assert wait_until(lambda: edge.latest_version() == version, 10)
                assert wait_until(lambda: "not reaching this server" in caplog.text, 5)
    warnings = [r.getMessage() for r in caplog.records if "not reaching this server" in r.getMessage()]
    assert len(warnings) == 1 and "version 2 reached this server by polling" in warnings[0] and silent in warnings[0]


def test_a_version_whose_manifest_says_it_was_not_announced_is_not_warned_about(tmp_path, source, models, capsys, caplog):  # noqa: F811
    """A rollback while the agent holds the announce endpoint reaches followers by polling, as documented: no warning.
    A version published after it that should have been announced still is warned about."""
    import time

    from cl_agent.repository import rollback

    publish(source, models[0])
    agent_announcer = Announcer(f"tcp://127.0.0.1:{free_port()}")  # the running agent holds the endpoint; it announces nothing here
    edge = ModelRepository(tmp_path / "edge", "student")
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        follower = RepositoryFollower(service.endpoint, agent_announcer.endpoint, edge, poll_s=0.2, timeout_s=2.0)
        try:
            follower._subscribed_at = time.monotonic() - 60  # subscribed long before (the loop is not run: syncs by hand)
            assert follower.sync_once() == 1
            assert rollback(source.root, "student", 1, announce_endpoint=agent_announcer.endpoint) == 0
            assert "warning: not announced" in capsys.readouterr().err
            with caplog.at_level(logging.WARNING, logger="cl_agent.follower"):
                assert follower.sync_once() == 2
                follower._check_unannounced(time.monotonic() + 60)  # long past the grace for its announcement
                assert "not reaching this server" not in caplog.text
                version = publish(source, models[1])  # the agent's publish: announced, but nothing arrived
                assert follower.sync_once() == version
                follower._check_unannounced(time.monotonic() + 60)
        finally:
            follower.client.close()
            agent_announcer.close()
    warnings = [r.getMessage() for r in caplog.records if "not reaching this server" in r.getMessage()]
    assert len(warnings) == 1 and f"version {version} reached this server by polling" in warnings[0]
