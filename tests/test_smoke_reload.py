from tests.harness import Load, assert_monotonic_versions, write_app


def test_hup_under_load_zero_failures(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch").ready()
    with Load(sv.port, clients=6, keepalive=True) as ka, Load(sv.port, clients=4, keepalive=False) as nk:
        ka.wait_requests(200)
        for version in ("2", "3"):
            write_app(app_dir, version)
            assert sv.reload()["outcome"] == "succeeded"
            ka.wait_requests(100)
            nk.wait_requests(50)
    assert not ka.failures(), ka.summary()
    assert not nk.failures(), nk.summary()
    assert_monotonic_versions(ka, ["version=1", "version=2", "version=3"])
    assert_monotonic_versions(nk, ["version=1", "version=2", "version=3"])
    assert ka.results[-1].body == nk.results[-1].body == "version=3"
    assert sv.stop() == 0
