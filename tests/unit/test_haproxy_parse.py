"""What the HAProxy adapter reads of HAProxy's answers: `show servers state` and `show stat`, as HAProxy
2.6 writes them (copied from a real one), and answers that are refusals instead."""

from __future__ import annotations

import pytest

from norm.adapters.haproxy import (
    HaproxyRejected,
    ServerState,
    admin_state,
    check_name,
    parse_servers_state,
    parse_stat,
)

HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
          "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
          "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl "
          "srv_check_port srv_check_addr srv_agent_addr srv_agent_port")
STATE = (f"1\n{HEADER}\n"
         "3 web 1 host1 127.0.0.1 0 5 1 1 0 1 0 0 8 0 0 0 - 18081 - 0 0 - - 0\n"
         "3 web 2 host2 127.0.0.1 2 12 3 1 7 1 0 2 0 0 0 0 - 18082 - 0 0 - - 0\n"
         "3 web 3 host3 10.0.0.3 2 0 1 1 7 1 0 2 0 0 0 0 - 18083 - 0 0 - - 0\n\n")


def test_show_servers_state_is_read_per_server() -> None:
    assert parse_servers_state(STATE, "web") == (
        ServerState("web", "host1", "maint", "down", "127.0.0.1", 18081, 1, admin_flags=5),
        ServerState("web", "host2", "drain", "up", "127.0.0.1", 18082, 3, admin_flags=12),
        ServerState("web", "host3", "ready", "up", "10.0.0.3", 18083, 1, admin_flags=0))
    assert parse_servers_state(STATE, "api") == ()


@pytest.mark.parametrize("answer", ["Can't find backend.\n\n", "", "Permission denied\n\n",
                                    "2\n# be_id be_name\n"])
def test_an_answer_that_is_not_a_servers_state_is_a_refusal(answer: str) -> None:
    with pytest.raises(HaproxyRejected) as e:
        parse_servers_state(answer, "web", "show servers state web")
    assert e.value.command == "show servers state web"


def test_a_server_line_with_words_where_numbers_belong_is_a_refusal() -> None:
    with pytest.raises(HaproxyRejected):
        parse_servers_state(STATE.replace(" 0 5 1 1 ", " x 5 1 1 "), "web")


def test_show_stat_is_read_as_csv_rows() -> None:
    rows = parse_stat("# pxname,svname,qcur,qmax,scur\nweb,host1,0,0,2\nweb,host2,0,0,0\n\n")
    assert [(r["svname"], r["scur"]) for r in rows] == [("host1", "2"), ("host2", "0")]
    with pytest.raises(HaproxyRejected, match="No such proxy"):
        parse_stat("No such proxy.\n\n", "show stat nope 4 -1")


def test_the_admin_state_mask() -> None:
    assert admin_state(0) == "ready" and admin_state(0x04) == "ready"  # `disabled` once set ready
    assert admin_state(0x08) == admin_state(0x10) == "drain"
    assert admin_state(0x01) == admin_state(0x02) == admin_state(0x20) == admin_state(0x09) == "maint"


@pytest.mark.parametrize("name", ["", "web server", "web\nshow", "web/1", "x" * 256, "wéb"])
def test_names_that_would_change_the_command_are_refused(name: str) -> None:
    with pytest.raises(HaproxyRejected):
        check_name("backend", name)
    check_name("backend", "web-1_a.b:c")
