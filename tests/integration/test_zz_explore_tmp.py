import psycopg, pytest, time
from psycopg import pq
from support.proxy import RunningProxy

@pytest.mark.parametrize("target", ["direct", "proxy"])
@pytest.mark.parametrize("sleep", [0, 0.2])
def test_x(tenant_db, target, tmp_path, sleep):
    proxy = RunningProxy(tenant_db.policy("rls"))
    u = tenant_db.user("acme")
    dsn = tenant_db.app_dsn if target == "direct" else proxy.dsn(u.name, u.password)
    sql = "SELEC 1" if target == "direct" else "SET app.tenant_id = 'x'"
    with psycopg.connect(dsn, autocommit=True) as c:
        with open(tmp_path / "trace", "w") as f:
            c.pgconn.trace(f.fileno())
            c.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                with c.pipeline():
                    c.execute(sql, prepare=True)
                    time.sleep(sleep)
            except Exception as e:
                print("ERR", repr(e))
            try:
                print(c.execute("SELECT 1").fetchall())
            except Exception as e:
                print("ERR2", repr(e))
            c.pgconn.untrace()
        with open(tmp_path / "trace") as g: print(g.read())
        c.close()
    proxy.stop()
