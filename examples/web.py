"""A tiny WSGI web app that hands slow work to brokerd and answers at once.

    python -m examples.web            # serves http://127.0.0.1:8000

    curl -X POST 'http://127.0.0.1:8000/signup?user=42&email=ada@example.com'
    -> 202 {"task_id": "..."}
    curl -X POST 'http://127.0.0.1:8000/posts?author=ada&post=7&text=hello'
    -> 202 {"task_id": "..."}
    curl http://127.0.0.1:8000/tasks/<task_id>
    -> 200 {"state": "SUCCESS", "result": 1000}

Plain WSGI (``wsgiref``) so the example needs nothing beyond brokerd; the same
three handlers drop into Flask or Django unchanged: each calls ``.delay()``,
which returns once brokerd has the task on disk.
"""

import json
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

from examples.tasks import app, fan_out_post, send_welcome_email


def respond(start_response, status: str, body: dict):
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def application(environ, start_response):
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "/")
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    try:
        if method == "POST" and path == "/signup":
            r = send_welcome_email.delay(int(q["user"]), q["email"])
            return respond(start_response, "202 Accepted", {"task_id": r.id})
        if method == "POST" and path == "/posts":
            r = fan_out_post.delay(q.get("author", "anon"), int(q["post"]), q.get("text", ""),
                                   int(q.get("followers", 1000)))
            return respond(start_response, "202 Accepted", {"task_id": r.id})
        if method == "GET" and path.startswith("/tasks/"):
            r = app.AsyncResult(path.rsplit("/", 1)[1])
            state = r.state
            body = {"state": state}
            if state == "SUCCESS":
                body["result"] = r.result
            elif state == "FAILURE":
                body["error"] = repr(r.result)
            return respond(start_response, "200 OK", body)
    except (KeyError, ValueError) as exc:
        return respond(start_response, "400 Bad Request", {"error": f"missing or bad parameter: {exc}"})
    return respond(start_response, "404 Not Found", {"error": f"no route for {method} {path}"})


def main(host="127.0.0.1", port=8000):
    with make_server(host, port, application) as httpd:
        print(f"example web app on http://{host}:{port}")
        httpd.serve_forever()


if __name__ == "__main__":
    main()
