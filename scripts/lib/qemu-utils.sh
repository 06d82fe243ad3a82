# Sourced by the scripts: installs qemu-utils (qemu-img creates, converts and inspects the
# local providers' disk images) when it is missing.
if ! command -v qemu-img >/dev/null; then
    echo "== installing qemu-utils"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq qemu-utils
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq qemu-utils
    fi
fi
