#!/usr/bin/env bash
# Makes sure a Java 17 runtime and Maven exist, then caches the Kafka broker jars
# (~/.cache/keytrace/kafka-<version>/ and ~/.m2). Safe to run again: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

java_major() {
    local v
    v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)"
    echo "${v:-0}"
}

need=()
if ! command -v java >/dev/null 2>&1 || [ "$(java_major)" -lt 17 ]; then
    need+=(openjdk-17-jre-headless)
fi
command -v mvn >/dev/null 2>&1 || need+=(maven)
# The broker script uses setpriv so that the JVM dies with its parent.
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)

if [ "${#need[@]}" -gt 0 ]; then
    echo "install_kafka: installing ${need[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

python=".venv/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
"$python" scripts/kafka_broker.py --fetch-only
